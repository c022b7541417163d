//! Reconciliation: keep every exposed DUT (and the gateway) registered as a
//! runner on each GitLab instance of MarsDB, write the tokens back, and keep
//! gitlab-runner's `config.toml` in step.
//!
//! # When
//!
//! [`Reconciler::run`] does a *full* pass at start-up and every
//! [`ReconcilerSettings::periodic_interval`] (30 minutes), and an
//! *incremental* pass on every MarsDB change. A full pass verifies every
//! exposed runner with GitLab; an incremental pass only checks the runners
//! whose description, tags, timeout, instance settings or token changed
//! since their last successful check (so a farm of 1,000 DUTs does not call
//! GitLab 2,000 times when one DUT is patched). After a pass with a
//! transient failure (GitLab down), the next pass comes after
//! [`ReconcilerSettings::retry_interval`] (60 s).
//!
//! # What, for each runner that should be exposed
//!
//! A runner should be exposed when its instance has `expose_runners`, its
//! entry is `exposed`, its instance URL is allowed (`https://`, or
//! `http://` with `GITLAB_ALLOW_INSECURE`) and, for a DUT, the DUT is
//! available (ready for service and not retired). Then:
//!
//! 1. with a token: verify it. Only a positive refusal (HTTP 403) drops it;
//!    any other failure keeps it and the runner stays in config.toml;
//! 2. with a valid token and an access token: read the runner's details;
//!    if the description, tag set or maximum timeout drifted, remove the
//!    runner and register a new one;
//! 3. without a (valid) token: register a runner; the new token and id are
//!    written back to MarsDB (`token`, `runner_id`: AUTO fields).
//!
//! Runners that should not be exposed (retired or unready DUTs, `exposed:
//! false`, `expose_runners: false`) keep their registration, as in the
//! reference, but leave config.toml. A DUT removed from MarsDB (by the REST
//! API, see [`Reconciler::remove_dut_runners`], or by an edit of the file)
//! has its runners removed from GitLab.
//!
//! # Invariants
//!
//! * A token is never discarded because GitLab could not be reached.
//! * A token that could not be written back to MarsDB (an invalid edit of
//!   the file blocks writes) is kept in memory, used in config.toml, and
//!   written at a later pass.
//! * A runner created for a DUT that disappeared meanwhile, or whose entry
//!   an admin changed meanwhile, is removed from GitLab again.
//! * Tokens never appear in logs or in the status snapshot.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::Serialize;
use tokio::sync::{watch, Mutex, Notify};
use vivian_core::marsdb::{
    Database, Dut, GitlabInstance, GitlabRunner, MacAddr, MarsDb, MarsDbExt, RunnerType,
    PLACEHOLDER_TOKEN,
};
use vivian_core::runner::{
    RegistryEndpoint, RegistryError, RunnerRegistry, RunnerScope, RunnerSpec, Secret, TokenState,
};

use crate::config::{
    gateway_tags, url_allowed, HostResources, RunnerConfigInput, RunnerConfigWriter,
};

/// Settings of a [`Reconciler`].
#[derive(Clone, Debug)]
pub struct ReconcilerSettings {
    /// `FARM_NAME`: prefix of every runner description, and the
    /// `farm:<FARM_NAME>` tag.
    pub farm_name: String,
    /// `GITLAB_ALLOW_INSECURE`: accept `http://` instance URLs.
    pub allow_insecure: bool,
    /// Time between full passes (default 30 minutes).
    pub periodic_interval: Duration,
    /// Time before the next pass after a transient failure (default 60 s).
    pub retry_interval: Duration,
    /// Quiet time after a MarsDB change before the pass, to batch bursts
    /// of changes (default 200 ms).
    pub debounce: Duration,
    /// GitLab calls in flight at once (default 8).
    pub concurrency: usize,
    /// The gateway's resources (gateway runner tags and limits).
    pub host: HostResources,
    /// Where to write config.toml; `None` to not write one.
    pub config: Option<RunnerConfigWriter>,
}

impl ReconcilerSettings {
    /// Defaults for `farm_name`: 30 min / 60 s / 200 ms / 8, this
    /// machine's resources, no config.toml.
    pub fn new(farm_name: impl Into<String>) -> Self {
        ReconcilerSettings {
            farm_name: farm_name.into(),
            allow_insecure: false,
            periodic_interval: Duration::from_secs(30 * 60),
            retry_interval: Duration::from_secs(60),
            debounce: Duration::from_millis(200),
            concurrency: 8,
            host: HostResources::detect(),
            config: None,
        }
    }

    /// The settings of the executor: `FARM_NAME`, `GITLAB_ALLOW_INSECURE`,
    /// and config.toml written to `GITLAB_CONF_FILE` from
    /// `GITLAB_CONF_TEMPLATE_FILE` (or the built-in template), with the job
    /// environment made of `MINIO_URL` and the `EXECUTOR_JOB__*` variables
    /// of `process_env` (pass `std::env::vars()`; names keep their case).
    pub fn from_config(
        config: &vivian_core::config::Config,
        process_env: impl IntoIterator<Item = (String, String)>,
    ) -> Self {
        let mut s = Self::new(config.farm_name.clone());
        s.allow_insecure = config.gitlab_allow_insecure;
        let template = match &config.gitlab_conf_template_file {
            Some(p) => crate::config::TemplateSource::File(p.clone()),
            None => crate::config::TemplateSource::BuiltIn,
        };
        s.config = Some(RunnerConfigWriter::new(
            config.gitlab_conf_file.clone(),
            template,
            crate::config::job_environment(process_env, config.minio_url.as_str()),
            s.host.clone(),
        ));
        s
    }
}

/// The state of one runner (one DUT or the gateway, on one instance), as
/// shown by the REST API. Never holds the token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RunnerStatus {
    /// The entry's `exposed` (the admin's wish for this instance).
    pub exposed: bool,
    /// Whether the runner should be served now: the DUT is available, the
    /// instance has `expose_runners`, the entry is `exposed` and the URL
    /// is allowed.
    pub active: bool,
    /// Whether MarsDB (or the pending write-back) holds a token for it.
    pub registered: bool,
    /// GitLab's runner id, when registered.
    pub runner_id: Option<u64>,
    /// The result of the last check with GitLab: `true` valid, `false`
    /// refused; `None` when not checked (inactive, or GitLab unreachable).
    pub is_valid: Option<bool>,
    /// Whether the runner is in gitlab-runner's config.toml.
    pub in_config: bool,
    /// When GitLab was last asked about it.
    pub last_checked: Option<DateTime<Utc>>,
    /// The last problem, if any (e.g. GitLab unreachable).
    pub error: Option<String>,
}

/// The runner states of one DUT (or of the gateway), by instance name.
pub type DutRunnerStatus = BTreeMap<String, RunnerStatus>;

/// The summary of one reconciliation pass.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ReconcileReport {
    /// Whether it was a full pass (every active runner verified).
    pub full: bool,
    /// Runners checked with GitLab.
    pub checked: usize,
    /// Runners registered (new or replacing a drifted/revoked one).
    pub registered: usize,
    /// Runners removed from GitLab (drift, deleted DUTs, orphans).
    pub removed: usize,
    /// Failures that may go away by themselves (GitLab unreachable).
    pub transient_failures: usize,
    /// Other failures (refused tokens, missing registration token, ...).
    pub failures: usize,
    /// Whether MarsDB was updated.
    pub db_updated: bool,
    /// Whether config.toml was rewritten.
    pub config_written: bool,
    /// Token write-backs still waiting for MarsDB to accept writes.
    pub pending_writes: usize,
    /// Runners waiting to be removed from GitLab.
    pub pending_removals: usize,
    /// The failures' messages.
    pub errors: Vec<String>,
}

/// The outcome of [`Reconciler::remove_dut_runners`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RemovalReport {
    /// Instances the DUT's runner was removed from (or was already gone).
    pub removed: Vec<String>,
    /// Instances where removal failed, with the reason; the removal is
    /// retried at each pass until it succeeds.
    pub retrying: Vec<(String, String)>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Owner {
    Gateway,
    Dut(MacAddr),
}

type Key = (Owner, String);

/// A token + id write-back waiting to be persisted.
#[derive(Clone, Debug)]
struct Pending {
    /// The DB token the check started from (compare-and-set).
    expected: String,
    token: String,
    runner_id: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Checked {
    fingerprint: String,
    token: Secret,
    runner_id: Option<u64>,
}

#[derive(Default)]
struct PassState {
    checked: HashMap<Key, Checked>,
    pending: HashMap<Key, Pending>,
    /// Registered DUT runners seen at the last pass: (endpoint, token) per DUT.
    known: HashMap<MacAddr, Vec<(RegistryEndpoint, Secret)>>,
    /// Runners to remove from GitLab, retried until done.
    orphans: Vec<(RegistryEndpoint, Secret)>,
}

#[derive(Default)]
struct Board {
    duts: HashMap<MacAddr, DutRunnerStatus>,
    gateway: DutRunnerStatus,
    last_report: Option<ReconcileReport>,
}

struct Inner {
    db: Arc<dyn MarsDb>,
    registry: Arc<dyn RunnerRegistry>,
    settings: ReconcilerSettings,
    pass: Mutex<PassState>,
    board: StdMutex<Board>,
    /// Changes whenever a status of the board changes (see
    /// [`Reconciler::status_version`]).
    status_version: AtomicU64,
    trigger: Notify,
    shutdown: watch::Sender<bool>,
}

/// Keeps the runners of MarsDB registered and config.toml in step (see the
/// [module documentation](self)). Cheap to clone: clones share the state.
#[derive(Clone)]
pub struct Reconciler {
    inner: Arc<Inner>,
}

/// Errors of the reconciler's own set-up.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// A setting is unusable.
    #[error("invalid reconciler setting {setting}: {reason}")]
    Setting {
        /// The setting's name.
        setting: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// What one check of one runner produced.
#[derive(Debug)]
struct Outcome {
    key: Key,
    /// New (token, id) to store: `Some(None)` clears the entry.
    change: Option<Option<(Secret, u64)>>,
    is_valid: Option<bool>,
    error: Option<RegistryError>,
    registered: bool,
    removed: bool,
    /// The (token, id) after the check, for the cache, when it succeeded.
    settled: Option<(Secret, Option<u64>)>,
    fingerprint: String,
}

struct Item {
    key: Key,
    endpoint: RegistryEndpoint,
    spec: Result<RunnerSpec, String>,
    current: Option<(Secret, Option<u64>)>,
    fingerprint: String,
}

fn secret_if_usable(token: &Option<String>) -> Option<Secret> {
    token
        .as_ref()
        .filter(|t| t.chars().count() >= 8 && t.as_str() != PLACEHOLDER_TOKEN)
        .map(|t| Secret::new(t.clone()))
}

fn endpoint_of(name: &str, gl: &GitlabInstance) -> RegistryEndpoint {
    RegistryEndpoint {
        name: name.to_string(),
        url: gl.url.clone(),
        registration_token: secret_if_usable(&gl.registration_token),
        access_token: secret_if_usable(&gl.access_token),
    }
}

fn scope_of(gl: &GitlabInstance) -> Result<RunnerScope, String> {
    match gl.runner_type {
        RunnerType::InstanceType => Ok(RunnerScope::Instance),
        RunnerType::GroupType => gl
            .group_id
            .map(RunnerScope::Group)
            .ok_or_else(|| "runner_type group_type needs a group_id".to_string()),
        RunnerType::ProjectType => gl
            .project_id
            .map(RunnerScope::Project)
            .ok_or_else(|| "runner_type project_type needs a project_id".to_string()),
    }
}

fn current_of(entry: &GitlabRunner) -> Option<(Secret, Option<u64>)> {
    entry.token_looks_valid().then(|| {
        (
            Secret::new(entry.token.clone()),
            u64::try_from(entry.runner_id).ok(),
        )
    })
}

/// What a successful check depends on: the instance (URL, a hash of its
/// access token: changing it calls for a new check) and the spec.
fn fingerprint(endpoint: &RegistryEndpoint, spec: &Result<RunnerSpec, String>) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    endpoint
        .access_token
        .as_ref()
        .map(|t| t.expose())
        .hash(&mut h);
    format!("{}|{:x}|{:?}", endpoint.url, h.finish(), spec)
}

/// Removes the runner of `token`; success also when GitLab no longer knows
/// the token (nothing left to remove).
async fn unregister(
    registry: &dyn RunnerRegistry,
    endpoint: &RegistryEndpoint,
    token: &Secret,
) -> Result<(), RegistryError> {
    match registry.remove(endpoint, token).await {
        Ok(()) | Err(RegistryError::InvalidToken { .. }) => Ok(()),
        Err(e) => match registry.verify(endpoint, token).await {
            Ok(TokenState::Invalid) => Ok(()),
            _ => Err(e),
        },
    }
}

/// Brings one runner in line with its spec (steps 1-3 of the module docs).
async fn ensure(registry: &dyn RunnerRegistry, item: Item) -> Outcome {
    let mut out = Outcome {
        key: item.key.clone(),
        change: None,
        is_valid: None,
        error: None,
        registered: false,
        removed: false,
        settled: None,
        fingerprint: item.fingerprint.clone(),
    };
    let who = match &item.key.0 {
        Owner::Gateway => "gateway".to_string(),
        Owner::Dut(mac) => mac.to_string(),
    };
    let spec = match &item.spec {
        Ok(s) => s,
        Err(reason) => {
            out.error = Some(RegistryError::Misconfigured {
                instance: item.endpoint.name.clone(),
                reason: reason.clone(),
            });
            return out;
        }
    };
    let ep = &item.endpoint;
    if let Some((token, id)) = &item.current {
        let mut replace = false;
        match registry.verify(ep, token).await {
            Ok(TokenState::Valid { runner_id }) => {
                out.is_valid = Some(true);
                // GitLab's id wins when it disagrees with MarsDB.
                let id = runner_id.or(*id);
                match id {
                    None => {
                        tracing::info!(runner = %who, instance = %ep.name, "runner has a token but no id: registering it again");
                        replace = true;
                    }
                    Some(id) => {
                        if ep.access_token.is_some() {
                            match registry.details(ep, id).await {
                                Ok(details) => {
                                    let drift = spec.drift(&details);
                                    if !drift.is_empty() {
                                        tracing::info!(runner = %who, instance = %ep.name, runner_id = id, drift = %drift.join("; "), "runner drifted: registering it again");
                                        replace = true;
                                    }
                                }
                                Err(e) => {
                                    tracing::warn!(runner = %who, instance = %ep.name, runner_id = id, error = %e, "cannot read the runner's details; keeping it");
                                    if Some(id) != item.current.as_ref().and_then(|c| c.1) {
                                        out.change = Some(Some((token.clone(), id)));
                                    }
                                    if !e.is_transient() {
                                        // A configuration problem (bad access
                                        // token): do not ask again before the
                                        // next full pass or a change.
                                        out.settled = Some((token.clone(), Some(id)));
                                    }
                                    out.error = Some(e);
                                    return out;
                                }
                            }
                        }
                        if !replace {
                            if Some(id) != item.current.as_ref().and_then(|c| c.1) {
                                out.change = Some(Some((token.clone(), id)));
                            }
                            out.settled = Some((token.clone(), Some(id)));
                            return out;
                        }
                    }
                }
            }
            Ok(TokenState::Invalid) => {
                tracing::info!(runner = %who, instance = %ep.name, "GitLab refused the runner token (runner deleted?): registering a new runner");
                out.is_valid = Some(false);
                out.change = Some(None);
            }
            Err(e) => {
                tracing::warn!(runner = %who, instance = %ep.name, error = %e, "cannot verify the runner token; keeping it, will retry");
                out.error = Some(e);
                return out;
            }
        }
        if replace {
            if let Err(e) = unregister(registry, ep, token).await {
                tracing::warn!(runner = %who, instance = %ep.name, error = %e, "cannot remove the outdated runner; keeping it, will retry");
                out.error = Some(e);
                return out;
            }
            out.removed = true;
            out.change = Some(None);
        }
    }
    match registry.register(ep, spec).await {
        Ok(reg) => {
            tracing::info!(runner = %who, instance = %ep.name, runner_id = reg.id, description = %spec.description, "registered runner");
            out.is_valid = Some(true);
            out.registered = true;
            out.change = Some(Some((reg.token.clone(), reg.id)));
            out.settled = Some((reg.token, Some(reg.id)));
        }
        Err(e) => {
            tracing::warn!(runner = %who, instance = %ep.name, error = %e, "cannot register the runner");
            out.error = Some(e);
        }
    }
    out
}

fn apply_entry(entry: &mut GitlabRunner, token: &str, runner_id: i64) {
    entry.token = token.to_string();
    entry.runner_id = runner_id;
}

fn entry_mut<'a>(db: &'a mut Database, key: &Key) -> Option<&'a mut GitlabRunner> {
    match &key.0 {
        Owner::Gateway => db.gitlab.get_mut(&key.1)?.gateway_runner.as_mut(),
        Owner::Dut(mac) => Some(
            db.duts
                .get_mut(mac)?
                .gitlab
                .entry(key.1.clone())
                .or_default(),
        ),
    }
}

fn entry_of<'a>(db: &'a Database, key: &Key) -> Option<&'a GitlabRunner> {
    match &key.0 {
        Owner::Gateway => db.gitlab.get(&key.1)?.gateway_runner.as_ref(),
        Owner::Dut(mac) => db.duts.get(mac)?.gitlab.get(&key.1),
    }
}

impl Reconciler {
    /// A reconciler of `db`'s runners on `registry`. Call [`Reconciler::run`]
    /// (or [`Reconciler::spawn`]) to keep them in step, or
    /// [`Reconciler::reconcile`] for one pass.
    pub fn new(
        db: Arc<dyn MarsDb>,
        registry: Arc<dyn RunnerRegistry>,
        settings: ReconcilerSettings,
    ) -> Result<Self, ReconcileError> {
        if settings.farm_name.trim().is_empty() {
            return Err(ReconcileError::Setting {
                setting: "farm_name",
                reason: "FARM_NAME cannot be empty".into(),
            });
        }
        if settings.concurrency == 0 {
            return Err(ReconcileError::Setting {
                setting: "concurrency",
                reason: "must be at least 1".into(),
            });
        }
        Ok(Reconciler {
            inner: Arc::new(Inner {
                db,
                registry,
                settings,
                pass: Mutex::new(PassState::default()),
                board: StdMutex::new(Board::default()),
                status_version: AtomicU64::new(0),
                trigger: Notify::new(),
                shutdown: watch::Sender::new(false),
            }),
        })
    }

    fn board(&self) -> std::sync::MutexGuard<'_, Board> {
        self.inner.board.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The runner states of DUT `id` by instance (empty before the first
    /// pass, or for an unknown DUT).
    pub fn dut_status(&self, id: &MacAddr) -> DutRunnerStatus {
        self.board().duts.get(id).cloned().unwrap_or_default()
    }

    /// A counter that changes whenever [`Reconciler::dut_status`] or
    /// [`Reconciler::gateway_status`] may answer differently: a cache of
    /// rendered statuses (the REST API's) stays valid while it holds.
    /// Reading it takes no lock.
    pub fn status_version(&self) -> u64 {
        self.inner.status_version.load(Ordering::Acquire)
    }

    fn status_changed(&self) {
        self.inner.status_version.fetch_add(1, Ordering::AcqRel);
    }

    /// The gateway runner's states by instance.
    pub fn gateway_status(&self) -> DutRunnerStatus {
        self.board().gateway.clone()
    }

    /// The report of the last pass.
    pub fn last_report(&self) -> Option<ReconcileReport> {
        self.board().last_report.clone()
    }

    /// Asks the running loop for an incremental pass now.
    pub fn trigger(&self) {
        self.inner.trigger.notify_one();
    }

    /// Asks the running loop to stop after its current pass.
    pub fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
    }

    /// Runs [`Reconciler::run`] on a new tokio task.
    pub fn spawn(&self) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move { me.run().await })
    }

    /// Reconciles at start-up, on every MarsDB change (incremental), every
    /// `periodic_interval` (full) and `retry_interval` after a transient
    /// failure, until [`Reconciler::shutdown`].
    pub async fn run(&self) {
        let s = &self.inner.settings;
        let mut changes = self.inner.db.subscribe();
        changes.borrow_and_update();
        let mut stop = self.inner.shutdown.subscribe();
        let mut full = true;
        let mut last_full = tokio::time::Instant::now();
        loop {
            if *stop.borrow_and_update() {
                break;
            }
            if full {
                last_full = tokio::time::Instant::now();
            }
            let report = self.reconcile(full).await;
            let retry = report.transient_failures > 0
                || report.pending_writes > 0
                || report.pending_removals > 0;
            let until_full = s.periodic_interval.saturating_sub(last_full.elapsed());
            let wait = if retry {
                s.retry_interval.min(until_full)
            } else {
                until_full
            };
            tokio::select! {
                r = changes.changed() => {
                    if r.is_err() {
                        tracing::warn!("MarsDB is gone: stopping the GitLab reconciler");
                        break;
                    }
                    tokio::time::sleep(s.debounce).await;
                    changes.borrow_and_update();
                }
                _ = tokio::time::sleep(wait) => {}
                _ = self.inner.trigger.notified() => {}
                _ = stop.changed() => break,
            }
            full = last_full.elapsed() >= s.periodic_interval;
        }
    }

    /// One pass; `full` verifies every active runner with GitLab, else only
    /// those whose inputs changed since their last successful check.
    pub async fn reconcile(&self, full: bool) -> ReconcileReport {
        let inner = &self.inner;
        let s = &inner.settings;
        let mut state = inner.pass.lock().await;
        let mut report = ReconcileReport {
            full,
            ..Default::default()
        };
        let snap = inner.db.snapshot();
        let now = Utc::now();

        // 1. What should be exposed.
        let mut items = Vec::new();
        let mut active: HashMap<Key, bool> = HashMap::new();
        let mut exposed: HashMap<Key, bool> = HashMap::new();
        let mut missing_entries: Vec<(MacAddr, String)> = Vec::new();
        let full_names: HashMap<MacAddr, String> = snap
            .duts
            .keys()
            .filter_map(|id| Some((*id, snap.full_name(id, &s.farm_name)?)))
            .collect();
        for (name, gl) in &snap.gitlab {
            let endpoint = endpoint_of(name, gl);
            let url_ok = url_allowed(&gl.url, s.allow_insecure);
            let scope = scope_of(gl);
            let mut owners: Vec<(Owner, GitlabRunner, bool, Result<RunnerSpec, String>)> =
                Vec::new();
            if let Some(gw) = &gl.gateway_runner {
                let spec = scope.clone().map(|scope| {
                    RunnerSpec::new(
                        format!("{}-gateway", s.farm_name),
                        gateway_tags(&s.farm_name, &s.host),
                        gl.maximum_timeout,
                        scope,
                    )
                });
                owners.push((Owner::Gateway, gw.clone(), true, spec));
            }
            for (id, dut) in &snap.duts {
                let entry = match dut.gitlab.get(name) {
                    Some(e) => e.clone(),
                    None => {
                        missing_entries.push((*id, name.clone()));
                        GitlabRunner::default()
                    }
                };
                let spec = scope.clone().map(|scope| {
                    RunnerSpec::new(
                        full_names.get(id).cloned().unwrap_or_default(),
                        dut.all_tags(&s.farm_name),
                        gl.maximum_timeout,
                        scope,
                    )
                });
                owners.push((Owner::Dut(*id), entry, dut.available(), spec));
            }
            for (owner, entry, available, spec) in owners {
                let key = (owner, name.clone());
                let is_active = available && gl.expose_runners && entry.exposed && url_ok;
                active.insert(key.clone(), is_active);
                exposed.insert(key.clone(), entry.exposed);
                if !is_active {
                    continue;
                }
                let current = match state.pending.get(&key) {
                    Some(p) => current_of(&GitlabRunner {
                        token: p.token.clone(),
                        exposed: true,
                        runner_id: p.runner_id,
                    }),
                    None => current_of(&entry),
                };
                let fp = fingerprint(&endpoint, &spec);
                let fresh = match (state.checked.get(&key), &current) {
                    (Some(c), Some((token, id))) => {
                        c.fingerprint == fp && &c.token == token && c.runner_id == *id
                    }
                    _ => false,
                };
                if full || !fresh {
                    items.push(Item {
                        key,
                        endpoint: endpoint.clone(),
                        spec,
                        current,
                        fingerprint: fp,
                    });
                }
            }
            if !url_ok {
                report.failures += 1;
                report.errors.push(format!(
                    "{name}: url {:?} is not https:// (set GITLAB_ALLOW_INSECURE to allow http://): its runners are not exposed",
                    gl.url
                ));
            }
        }

        // 2. Check them with GitLab, a few at a time.
        report.checked = items.len();
        let registry = inner.registry.clone();
        let outcomes: Vec<Outcome> = futures::stream::iter(items)
            .map(|item| {
                let registry = registry.clone();
                async move { ensure(registry.as_ref(), item).await }
            })
            .buffer_unordered(s.concurrency)
            .collect()
            .await;

        let mut errors_by_key: HashMap<Key, Option<String>> = HashMap::new();
        let mut valid_by_key: HashMap<Key, Option<bool>> = HashMap::new();
        for o in outcomes {
            if o.registered {
                report.registered += 1;
            }
            if o.removed {
                report.removed += 1;
            }
            if let Some(change) = &o.change {
                let expected = state
                    .pending
                    .get(&o.key)
                    .map(|p| p.expected.clone())
                    .or_else(|| entry_of(&snap, &o.key).map(|e| e.token.clone()))
                    .unwrap_or_else(|| PLACEHOLDER_TOKEN.to_string());
                let (token, runner_id) = match change {
                    Some((t, id)) => (t.expose().to_string(), *id as i64),
                    None => (PLACEHOLDER_TOKEN.to_string(), -1),
                };
                state.pending.insert(
                    o.key.clone(),
                    Pending {
                        expected,
                        token,
                        runner_id,
                    },
                );
            }
            match &o.settled {
                Some((token, id)) => {
                    state.checked.insert(
                        o.key.clone(),
                        Checked {
                            fingerprint: o.fingerprint.clone(),
                            token: token.clone(),
                            runner_id: *id,
                        },
                    );
                }
                _ => {
                    state.checked.remove(&o.key);
                }
            }
            if let Some(e) = &o.error {
                if e.is_transient() {
                    report.transient_failures += 1;
                } else {
                    report.failures += 1;
                }
                report.errors.push(e.to_string());
            }
            errors_by_key.insert(o.key.clone(), o.error.as_ref().map(|e| e.to_string()));
            valid_by_key.insert(o.key, o.is_valid);
        }

        // 3. DUTs that vanished from MarsDB: remove their runners.
        let vanished: Vec<MacAddr> = state
            .known
            .keys()
            .filter(|id| !snap.duts.contains_key(*id))
            .copied()
            .collect();
        for id in vanished {
            if let Some(runners) = state.known.remove(&id) {
                tracing::info!(dut = %id, "DUT removed from MarsDB: removing its runners");
                state.orphans.extend(runners);
            }
            state.checked.retain(|k, _| k.0 != Owner::Dut(id));
            state.pending.retain(|k, _| k.0 != Owner::Dut(id));
        }

        // 4. Write tokens back (compare-and-set on the token each check
        //    started from) and add the default entries.
        let pending: Vec<(Key, Pending)> = state
            .pending
            .iter()
            .map(|(k, p)| (k.clone(), p.clone()))
            .collect();
        if !pending.is_empty() || !missing_entries.is_empty() {
            let missing = missing_entries.clone();
            let to_apply = pending.clone();
            let res = inner
                .db
                .update(move |db: &mut Database| {
                    let mut conflicts: Vec<Key> = Vec::new();
                    let mut gone: Vec<Key> = Vec::new();
                    for (id, instance) in &missing {
                        if db.gitlab.contains_key(instance) {
                            if let Some(dut) = db.duts.get_mut(id) {
                                dut.gitlab.entry(instance.clone()).or_default();
                            }
                        }
                    }
                    for (key, p) in &to_apply {
                        let instance_exists = db.gitlab.contains_key(&key.1);
                        match entry_mut(db, key) {
                            Some(entry) if instance_exists => {
                                if entry.token == p.token {
                                    entry.runner_id = p.runner_id;
                                } else if entry.token == p.expected {
                                    apply_entry(entry, &p.token, p.runner_id);
                                } else {
                                    conflicts.push(key.clone());
                                }
                            }
                            _ => gone.push(key.clone()),
                        }
                    }
                    Ok::<_, std::convert::Infallible>((conflicts, gone))
                })
                .await;
            match res {
                Ok((conflicts, gone)) => {
                    report.db_updated = true;
                    for (key, p) in pending {
                        state.pending.remove(&key);
                        if conflicts.contains(&key) || gone.contains(&key) {
                            state.checked.remove(&key);
                            if p.token != PLACEHOLDER_TOKEN && p.token.len() >= 8 {
                                // The runner we created has no home: remove it.
                                if let Some(gl) = snap.gitlab.get(&key.1) {
                                    tracing::info!(instance = %key.1, "the runner entry changed or vanished meanwhile: removing the runner just created");
                                    state
                                        .orphans
                                        .push((endpoint_of(&key.1, gl), Secret::new(p.token)));
                                }
                            }
                        }
                    }
                }
                Err(e) => {
                    report.failures += 1;
                    report.errors.push(format!(
                        "cannot write runner tokens back to MarsDB (kept in memory, retried later): {e}"
                    ));
                    tracing::warn!(error = %e, "cannot write runner tokens back to MarsDB; kept in memory");
                }
            }
        }

        // 5. Remove orphan runners.
        let orphans = std::mem::take(&mut state.orphans);
        for (ep, token) in orphans {
            match unregister(inner.registry.as_ref(), &ep, &token).await {
                Ok(()) => report.removed += 1,
                Err(e) => {
                    if e.is_transient() {
                        report.transient_failures += 1;
                        state.orphans.push((ep, token));
                    } else {
                        report.failures += 1;
                    }
                    report.errors.push(format!("removing a runner: {e}"));
                }
            }
        }

        // 6. The effective database: MarsDB plus what is not written yet.
        let mut effective: Database = (*inner.db.snapshot()).clone();
        for (key, p) in &state.pending {
            if effective.gitlab.contains_key(&key.1) {
                if let Some(entry) = entry_mut(&mut effective, key) {
                    apply_entry(entry, &p.token, p.runner_id);
                }
            }
        }
        report.pending_writes = state.pending.len();
        report.pending_removals = state.orphans.len();

        // Remember the registered DUT runners, to remove them if the DUT
        // disappears from MarsDB.
        state.known.clear();
        for (id, dut) in &effective.duts {
            let runners: Vec<_> = dut
                .gitlab
                .iter()
                .filter_map(|(name, e)| {
                    let gl = effective.gitlab.get(name)?;
                    e.token_looks_valid()
                        .then(|| (endpoint_of(name, gl), Secret::new(e.token.clone())))
                })
                .collect();
            if !runners.is_empty() {
                state.known.insert(*id, runners);
            }
        }

        // 7. config.toml.
        let input =
            RunnerConfigInput::from_database(&effective, &s.farm_name, &s.host, s.allow_insecure);
        if let Some(writer) = &s.config {
            match writer.write(&input) {
                Ok(written) => {
                    report.config_written = written;
                    if written {
                        tracing::info!(path = %writer.path().display(), gateway_runners = input.gateway_runners.len(), dut_runners = input.dut_runners.len(), "wrote the gitlab-runner configuration");
                    }
                }
                Err(e) => {
                    report.failures += 1;
                    tracing::error!(error = %e, "cannot generate the gitlab-runner configuration");
                    report.errors.push(e.to_string());
                }
            }
        }

        // 8. Statuses.
        let in_config: std::collections::HashSet<Key> = input
            .gateway_runners
            .iter()
            .map(|r| (Owner::Gateway, r.instance.clone()))
            .chain(input.dut_runners.iter().filter_map(|r| {
                let mac: MacAddr = r.dut_id.as_ref()?.parse().ok()?;
                Some((Owner::Dut(mac), r.instance.clone()))
            }))
            .collect();
        let mut board = self.board();
        let previous_duts = std::mem::take(&mut board.duts);
        let previous_gateway = std::mem::take(&mut board.gateway);
        for (key, is_active) in &active {
            let Some(entry) = entry_of(&effective, key)
                .cloned()
                .or_else(|| matches!(key.0, Owner::Dut(_)).then(GitlabRunner::default))
            else {
                continue;
            };
            let previous = match &key.0 {
                Owner::Gateway => previous_gateway.get(&key.1),
                Owner::Dut(mac) => previous_duts.get(mac).and_then(|m| m.get(&key.1)),
            };
            let checked_now = valid_by_key.contains_key(key);
            let status = RunnerStatus {
                exposed: *exposed.get(key).unwrap_or(&entry.exposed),
                active: *is_active,
                registered: entry.token_looks_valid(),
                runner_id: u64::try_from(entry.runner_id).ok(),
                is_valid: if !is_active {
                    None
                } else if checked_now {
                    valid_by_key.get(key).copied().flatten()
                } else if state.checked.contains_key(key) {
                    Some(true)
                } else {
                    previous.and_then(|p| p.is_valid)
                },
                in_config: in_config.contains(key),
                last_checked: if checked_now {
                    Some(now)
                } else {
                    previous.and_then(|p| p.last_checked)
                },
                error: if checked_now {
                    errors_by_key.get(key).cloned().flatten()
                } else if *is_active {
                    previous.and_then(|p| p.error.clone())
                } else {
                    None
                },
            };
            match &key.0 {
                Owner::Gateway => {
                    board.gateway.insert(key.1.clone(), status);
                }
                Owner::Dut(mac) => {
                    board
                        .duts
                        .entry(*mac)
                        .or_default()
                        .insert(key.1.clone(), status);
                }
            }
        }
        if report.transient_failures > 0 || report.failures > 0 {
            tracing::warn!(
                checked = report.checked,
                registered = report.registered,
                transient_failures = report.transient_failures,
                failures = report.failures,
                "GitLab runner reconciliation finished with failures"
            );
        } else {
            tracing::debug!(
                checked = report.checked,
                registered = report.registered,
                "GitLab runner reconciliation done"
            );
        }
        board.last_report = Some(report.clone());
        let changed = board.duts != previous_duts || board.gateway != previous_gateway;
        drop(board);
        if changed {
            self.status_changed();
        }
        report
    }

    /// Removes every runner of DUT `id` from GitLab (for `DELETE
    /// /api/v1/dut/<id>`), whether the DUT is still in MarsDB or was just
    /// removed from it, and writes placeholders back if it is still there.
    /// A removal GitLab could not be reached for is retried at each pass
    /// (in memory) until it succeeds.
    pub async fn remove_dut_runners(&self, id: &MacAddr) -> RemovalReport {
        self.remove_runners_of(id, None).await
    }

    /// Like [`Reconciler::remove_dut_runners`], for a DUT already removed
    /// from MarsDB whose last record is `removed` (taken just before the
    /// removal): its tokens are removed from GitLab too, even those no
    /// pass has seen yet (a token an admin wrote into the file moments
    /// before deleting the DUT through the API). With `None`, the tokens
    /// are those of MarsDB's current record, if the DUT is still there.
    pub async fn remove_runners_of(&self, id: &MacAddr, removed: Option<&Dut>) -> RemovalReport {
        let inner = &self.inner;
        let mut state = inner.pass.lock().await;
        let snap = inner.db.snapshot();
        let tokens_of = |dut: &Dut| -> Vec<(RegistryEndpoint, Secret)> {
            dut.gitlab
                .iter()
                .filter_map(|(name, e)| {
                    let gl = snap.gitlab.get(name)?;
                    e.token_looks_valid()
                        .then(|| (endpoint_of(name, gl), Secret::new(e.token.clone())))
                })
                .collect()
        };
        let mut runners: Vec<(RegistryEndpoint, Secret)> = match snap.duts.get(id) {
            Some(dut) => tokens_of(dut),
            None => Vec::new(),
        };
        if let Some(dut) = removed {
            for r in tokens_of(dut) {
                if !runners
                    .iter()
                    .any(|(ep, t)| ep.name == r.0.name && t == &r.1)
                {
                    runners.push(r);
                }
            }
        }
        for (key, p) in &state.pending {
            if key.0 == Owner::Dut(*id) && p.token != PLACEHOLDER_TOKEN {
                if let Some(gl) = snap.gitlab.get(&key.1) {
                    runners.push((endpoint_of(&key.1, gl), Secret::new(p.token.clone())));
                }
            }
        }
        if let Some(known) = state.known.remove(id) {
            for r in known {
                if !runners
                    .iter()
                    .any(|(ep, t)| ep.name == r.0.name && t == &r.1)
                {
                    runners.push(r);
                }
            }
        }
        state.checked.retain(|k, _| k.0 != Owner::Dut(*id));
        state.pending.retain(|k, _| k.0 != Owner::Dut(*id));
        let mut report = RemovalReport::default();
        let mut done = Vec::new();
        for (ep, token) in runners {
            match unregister(inner.registry.as_ref(), &ep, &token).await {
                Ok(()) => {
                    tracing::info!(dut = %id, instance = %ep.name, "removed the DUT's runner");
                    report.removed.push(ep.name.clone());
                    done.push(ep.name.clone());
                }
                Err(e) => {
                    tracing::warn!(dut = %id, instance = %ep.name, error = %e, "cannot remove the DUT's runner; will retry");
                    report.retrying.push((ep.name.clone(), e.to_string()));
                    state.orphans.push((ep, token));
                }
            }
        }
        if snap.duts.contains_key(id) && !done.is_empty() {
            let id = *id;
            let res = inner
                .db
                .update(move |db: &mut Database| {
                    if let Some(dut) = db.duts.get_mut(&id) {
                        for name in &done {
                            if let Some(e) = dut.gitlab.get_mut(name) {
                                apply_entry(e, PLACEHOLDER_TOKEN, -1);
                            }
                        }
                    }
                    Ok::<_, std::convert::Infallible>(())
                })
                .await;
            if let Err(e) = res {
                tracing::warn!(dut = %id, error = %e, "cannot clear the removed runners' tokens in MarsDB");
            }
        }
        let had_status = self.board().duts.remove(id).is_some();
        if had_status {
            self.status_changed();
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_from_the_executor_config() {
        let mut config = vivian_core::config::Config::with_farm_name("myfarm").unwrap();
        config.gitlab_allow_insecure = true;
        config.gitlab_conf_file = "/tmp/x/config.toml".into();
        let s = ReconcilerSettings::from_config(
            &config,
            vec![
                ("EXECUTOR_JOB__FOO".to_string(), "bar".to_string()),
                ("HOME".to_string(), "/root".to_string()),
            ],
        );
        assert_eq!(s.farm_name, "myfarm");
        assert!(s.allow_insecure);
        assert_eq!(s.periodic_interval, Duration::from_secs(1800));
        let w = s.config.unwrap();
        assert_eq!(w.path(), std::path::Path::new("/tmp/x/config.toml"));
        let text = w
            .render(&RunnerConfigInput {
                farm_name: "myfarm".into(),
                gateway_runners: vec![crate::config::RunnerConfigEntry {
                    instance: "gl".into(),
                    name: "myfarm-gateway".into(),
                    url: "https://gitlab.example".into(),
                    token: Secret::new("glrt-0123456789"),
                    tags: vec![],
                    dut_id: None,
                }],
                dut_runners: vec![],
            })
            .unwrap();
        let minio = format!("MINIO_URL={}", config.minio_url.as_str());
        let line = format!("environment = [\"{minio}\", \"FOO=bar\"]");
        assert!(text.contains(&line), "{line} missing from\n{text}");
    }

    #[test]
    fn reconciler_refuses_bad_settings() {
        let db: Arc<dyn MarsDb> = Arc::new(vivian_core::marsdb::MemoryMarsDb::new(Database::new()));
        let reg: Arc<dyn RunnerRegistry> = Arc::new(vivian_core::runner::InMemoryRegistry::new());
        let mut s = ReconcilerSettings::new(" ");
        assert!(Reconciler::new(db.clone(), reg.clone(), s.clone()).is_err());
        s.farm_name = "f".into();
        s.concurrency = 0;
        assert!(Reconciler::new(db, reg, s).is_err());
    }
}
