//! CI runner registries: where each DUT (and the gateway) is exposed as a
//! CI runner, e.g. a GitLab instance.
//!
//! [`RunnerRegistry`] is the transport-free boundary: register a runner,
//! verify its token, read its details, remove it. `vivian-gitlab` implements
//! it over GitLab's REST API; [`InMemoryRegistry`] implements it in memory
//! for tests and embedders.
//!
//! # Invariants every implementation keeps
//!
//! * [`RunnerRegistry::verify`] answers [`TokenState::Invalid`] only when the
//!   registry positively said that the token is unknown (GitLab: HTTP 403).
//!   A registry that cannot be reached, or answers anything else, gives an
//!   error: a registry outage must never make a caller discard a token.
//! * [`RunnerRegistry::remove`] answers `Ok(())` when the runner was removed
//!   and [`RegistryError::InvalidToken`] when the registry does not know the
//!   token (so there is nothing left to remove).
//! * Tokens travel as [`Secret`]s, whose `Debug` and `Display` are masked:
//!   no token ever reaches a log line through formatting.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Mutex;

use async_trait::async_trait;

/// A secret string (runner or API token). `Debug` and `Display` print
/// `***`; read the value with [`Secret::expose`] only where it must be sent
/// or stored.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret value itself. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Secret(s)
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Secret(s.to_string())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Where a runner is registered: the whole instance, one group or one
/// project. Ids are the registry's numeric ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RunnerScope {
    /// An instance-wide runner (GitLab: needs an administrator's token).
    Instance,
    /// A runner of the group with this id.
    Group(u64),
    /// A runner of the project with this id.
    Project(u64),
}

impl RunnerScope {
    /// The GitLab `runner_type` of this scope (`instance_type`,
    /// `group_type`, `project_type`).
    pub fn runner_type(&self) -> &'static str {
        match self {
            RunnerScope::Instance => "instance_type",
            RunnerScope::Group(_) => "group_type",
            RunnerScope::Project(_) => "project_type",
        }
    }
}

/// The runner a caller wants: what the registry must hold for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunnerSpec {
    /// Description (the DUT's full name, or `<FARM_NAME>-gateway`).
    pub description: String,
    /// Tags, sorted and without duplicates (see [`RunnerSpec::new`]).
    pub tags: Vec<String>,
    /// Maximum job timeout, in seconds.
    pub maximum_timeout: u64,
    /// Where the runner is registered.
    pub scope: RunnerScope,
}

impl RunnerSpec {
    /// A spec; `tags` are sorted and de-duplicated.
    pub fn new(
        description: impl Into<String>,
        tags: impl IntoIterator<Item = String>,
        maximum_timeout: u64,
        scope: RunnerScope,
    ) -> Self {
        let mut tags: Vec<String> = tags.into_iter().collect();
        tags.sort();
        tags.dedup();
        RunnerSpec {
            description: description.into(),
            tags,
            maximum_timeout,
            scope,
        }
    }

    /// How `details` differs from this spec in description, tag set or
    /// maximum timeout (the fields that are checked for drift), as a
    /// human-readable list; empty when they match.
    pub fn drift(&self, details: &RunnerDetails) -> Vec<String> {
        let mut out = Vec::new();
        if details.description != self.description {
            out.push(format!(
                "description is {:?}, expected {:?}",
                details.description, self.description
            ));
        }
        let mut tags = details.tags.clone();
        tags.sort();
        tags.dedup();
        if tags != self.tags {
            out.push(format!("tags are {:?}, expected {:?}", tags, self.tags));
        }
        if details.maximum_timeout != Some(self.maximum_timeout) {
            out.push(format!(
                "maximum_timeout is {:?}, expected {}",
                details.maximum_timeout, self.maximum_timeout
            ));
        }
        out
    }
}

/// How to reach one registry instance and which tokens to use there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistryEndpoint {
    /// The instance's name (MarsDB `gitlab.<name>`), for messages.
    pub name: String,
    /// Base URL (`https://gitlab.example.com`, with or without a trailing
    /// `/`).
    pub url: String,
    /// Token allowed to create runners (GitLab: a personal, group or
    /// project access token with the `create_runner` scope).
    pub registration_token: Option<Secret>,
    /// Token allowed to read runner details (GitLab: `read_api`, or
    /// `manage_runner`), used to detect drift.
    pub access_token: Option<Secret>,
}

/// A runner just created by [`RunnerRegistry::register`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegisteredRunner {
    /// The registry's id of the runner.
    pub id: u64,
    /// The runner's authentication token (what gitlab-runner uses).
    pub token: Secret,
}

/// What the registry knows of a runner ([`RunnerRegistry::details`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RunnerDetails {
    /// The registry's id of the runner.
    pub id: u64,
    /// Its description.
    pub description: String,
    /// Its tags, as the registry lists them.
    pub tags: Vec<String>,
    /// Its maximum job timeout in seconds, if it has one.
    pub maximum_timeout: Option<u64>,
    /// Its scope as the registry names it (`instance_type`, ...), if given.
    pub runner_type: Option<String>,
    /// Its status as the registry names it (`online`, `offline`,
    /// `never_contacted`, ...), if given.
    pub status: Option<String>,
}

/// The answer of [`RunnerRegistry::verify`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenState {
    /// The registry knows the token; `runner_id` is the runner's id when
    /// the registry tells it.
    Valid {
        /// The runner's id, if the registry returned it.
        runner_id: Option<u64>,
    },
    /// The registry positively refused the token: the runner no longer
    /// exists there.
    Invalid,
}

/// Errors of a [`RunnerRegistry`]. None of them carries a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The registry could not be reached or is overloaded or failing
    /// (network error, timeout, HTTP 429 or 5xx after retries). Transient:
    /// try again later, and keep every token.
    #[error("{instance}: registry unreachable: {reason}")]
    Unreachable {
        /// Instance name.
        instance: String,
        /// What failed.
        reason: String,
    },
    /// The runner token is unknown to the registry (GitLab: HTTP 403 on
    /// `verify` or `DELETE /runners`).
    #[error("{instance}: the runner token is not valid (anymore)")]
    InvalidToken {
        /// Instance name.
        instance: String,
    },
    /// The registry refused the request (an HTTP 4xx other than the cases
    /// above): a missing or under-privileged registration/access token, a
    /// bad group or project id...
    #[error("{instance}: {operation} refused with HTTP {status}: {message}")]
    Refused {
        /// Instance name.
        instance: String,
        /// What was attempted (`register`, `details`, ...).
        operation: String,
        /// HTTP status code.
        status: u16,
        /// The registry's message, shortened.
        message: String,
    },
    /// The registry answered something that cannot be understood.
    #[error("{instance}: unexpected answer to {operation}: {reason}")]
    BadResponse {
        /// Instance name.
        instance: String,
        /// What was attempted.
        operation: String,
        /// What is wrong with the answer.
        reason: String,
    },
    /// The request cannot be made with this configuration (no registration
    /// token, a URL that is not allowed...).
    #[error("{instance}: {reason}")]
    Misconfigured {
        /// Instance name.
        instance: String,
        /// What is wrong, naming the setting.
        reason: String,
    },
}

impl RegistryError {
    /// Whether trying again later may succeed without any configuration
    /// change ([`RegistryError::Unreachable`]).
    pub fn is_transient(&self) -> bool {
        matches!(self, RegistryError::Unreachable { .. })
    }
}

/// A CI runner registry (e.g. one GitLab server, or several: each call names
/// its [`RegistryEndpoint`]). Object-safe; see the
/// [module documentation](self) for the invariants.
#[async_trait]
pub trait RunnerRegistry: Send + Sync {
    /// Creates a runner as described by `spec`, with the endpoint's
    /// registration token. Errors: [`RegistryError::Misconfigured`] without
    /// a registration token, [`RegistryError::Refused`],
    /// [`RegistryError::Unreachable`], [`RegistryError::BadResponse`].
    async fn register(
        &self,
        endpoint: &RegistryEndpoint,
        spec: &RunnerSpec,
    ) -> Result<RegisteredRunner, RegistryError>;

    /// Checks whether the registry still knows the runner `token`.
    /// [`TokenState::Invalid`] only on a positive refusal; any other
    /// failure is an error.
    async fn verify(
        &self,
        endpoint: &RegistryEndpoint,
        token: &Secret,
    ) -> Result<TokenState, RegistryError>;

    /// Reads the runner `runner_id` with the endpoint's access token.
    /// Errors: [`RegistryError::Misconfigured`] without an access token,
    /// [`RegistryError::Refused`] (including "not found"), ...
    async fn details(
        &self,
        endpoint: &RegistryEndpoint,
        runner_id: u64,
    ) -> Result<RunnerDetails, RegistryError>;

    /// Removes the runner authenticated by `token`.
    /// [`RegistryError::InvalidToken`] when the registry does not know it.
    async fn remove(
        &self,
        endpoint: &RegistryEndpoint,
        token: &Secret,
    ) -> Result<(), RegistryError>;
}

/// One runner held by an [`InMemoryRegistry`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InMemoryRunner {
    /// Its id.
    pub id: u64,
    /// Its token.
    pub token: Secret,
    /// What it was registered with (and may since have been edited to).
    pub spec: RunnerSpec,
}

#[derive(Default)]
struct MemState {
    next_id: u64,
    /// url (without trailing '/') → id → runner
    runners: BTreeMap<String, BTreeMap<u64, InMemoryRunner>>,
    unreachable: bool,
    calls: BTreeMap<&'static str, u64>,
}

/// A [`RunnerRegistry`] in memory, for tests and embedders: every endpoint
/// URL is a separate instance; any registration token is accepted, the
/// access token must be set for [`RunnerRegistry::details`].
///
/// Test hooks simulate the server side: [`InMemoryRegistry::delete_runner`]
/// (an admin deleting a runner), [`InMemoryRegistry::edit_runner`] (drift)
/// and [`InMemoryRegistry::set_unreachable`] (an outage).
#[derive(Default)]
pub struct InMemoryRegistry {
    state: Mutex<MemState>,
}

fn url_key(url: &str) -> String {
    url.trim_end_matches('/').to_string()
}

impl InMemoryRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The runners of the instance at `url`, by id.
    pub fn runners(&self, url: &str) -> Vec<InMemoryRunner> {
        self.lock()
            .runners
            .get(&url_key(url))
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Deletes a runner as an administrator would on the server side.
    /// Returns whether it existed.
    pub fn delete_runner(&self, url: &str, id: u64) -> bool {
        self.lock()
            .runners
            .get_mut(&url_key(url))
            .and_then(|m| m.remove(&id))
            .is_some()
    }

    /// Edits a runner's spec on the server side. Returns whether it existed.
    pub fn edit_runner(&self, url: &str, id: u64, edit: impl FnOnce(&mut RunnerSpec)) -> bool {
        match self
            .lock()
            .runners
            .get_mut(&url_key(url))
            .and_then(|m| m.get_mut(&id))
        {
            Some(r) => {
                edit(&mut r.spec);
                true
            }
            None => false,
        }
    }

    /// Makes every call fail with [`RegistryError::Unreachable`] (or work
    /// again).
    pub fn set_unreachable(&self, unreachable: bool) {
        self.lock().unreachable = unreachable;
    }

    /// How many times `operation` (`register`, `verify`, `details`,
    /// `remove`) was called.
    pub fn calls(&self, operation: &str) -> u64 {
        self.lock().calls.get(operation).copied().unwrap_or(0)
    }

    fn enter(
        &self,
        op: &'static str,
        endpoint: &RegistryEndpoint,
    ) -> Result<std::sync::MutexGuard<'_, MemState>, RegistryError> {
        let mut st = self.lock();
        *st.calls.entry(op).or_default() += 1;
        if st.unreachable {
            return Err(RegistryError::Unreachable {
                instance: endpoint.name.clone(),
                reason: "simulated outage".into(),
            });
        }
        Ok(st)
    }
}

#[async_trait]
impl RunnerRegistry for InMemoryRegistry {
    async fn register(
        &self,
        endpoint: &RegistryEndpoint,
        spec: &RunnerSpec,
    ) -> Result<RegisteredRunner, RegistryError> {
        let mut st = self.enter("register", endpoint)?;
        if endpoint.registration_token.is_none() {
            return Err(RegistryError::Misconfigured {
                instance: endpoint.name.clone(),
                reason: "no registration_token: cannot create runners".into(),
            });
        }
        st.next_id += 1;
        let id = st.next_id;
        let token = Secret::new(format!("glrt-mem-{id:08}"));
        st.runners
            .entry(url_key(&endpoint.url))
            .or_default()
            .insert(
                id,
                InMemoryRunner {
                    id,
                    token: token.clone(),
                    spec: spec.clone(),
                },
            );
        Ok(RegisteredRunner { id, token })
    }

    async fn verify(
        &self,
        endpoint: &RegistryEndpoint,
        token: &Secret,
    ) -> Result<TokenState, RegistryError> {
        let st = self.enter("verify", endpoint)?;
        let found = st
            .runners
            .get(&url_key(&endpoint.url))
            .and_then(|m| m.values().find(|r| &r.token == token).map(|r| r.id));
        Ok(match found {
            Some(id) => TokenState::Valid {
                runner_id: Some(id),
            },
            None => TokenState::Invalid,
        })
    }

    async fn details(
        &self,
        endpoint: &RegistryEndpoint,
        runner_id: u64,
    ) -> Result<RunnerDetails, RegistryError> {
        let st = self.enter("details", endpoint)?;
        if endpoint.access_token.is_none() {
            return Err(RegistryError::Misconfigured {
                instance: endpoint.name.clone(),
                reason: "no access_token: cannot read runner details".into(),
            });
        }
        let r = st
            .runners
            .get(&url_key(&endpoint.url))
            .and_then(|m| m.get(&runner_id))
            .ok_or_else(|| RegistryError::Refused {
                instance: endpoint.name.clone(),
                operation: "details".into(),
                status: 404,
                message: "404 Not found".into(),
            })?;
        Ok(RunnerDetails {
            id: r.id,
            description: r.spec.description.clone(),
            tags: r.spec.tags.clone(),
            maximum_timeout: Some(r.spec.maximum_timeout),
            runner_type: Some(r.spec.scope.runner_type().to_string()),
            status: Some("online".into()),
        })
    }

    async fn remove(
        &self,
        endpoint: &RegistryEndpoint,
        token: &Secret,
    ) -> Result<(), RegistryError> {
        let mut st = self.enter("remove", endpoint)?;
        let runners = st.runners.entry(url_key(&endpoint.url)).or_default();
        let id = runners.values().find(|r| &r.token == token).map(|r| r.id);
        match id {
            Some(id) => {
                runners.remove(&id);
                Ok(())
            }
            None => Err(RegistryError::InvalidToken {
                instance: endpoint.name.clone(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint() -> RegistryEndpoint {
        RegistryEndpoint {
            name: "gl".into(),
            url: "https://gitlab.example/".into(),
            registration_token: Some(Secret::new("glpat-registration")),
            access_token: Some(Secret::new("glpat-access")),
        }
    }

    #[test]
    fn secret_is_masked_in_debug_and_display() {
        let s = Secret::new("glrt-very-secret");
        assert_eq!(format!("{s}"), "***");
        assert_eq!(format!("{s:?}"), "Secret(***)");
        let ep = endpoint();
        let dbg = format!("{ep:?}");
        assert!(!dbg.contains("glpat-registration"), "{dbg}");
        assert!(!dbg.contains("glpat-access"), "{dbg}");
        assert_eq!(s.expose(), "glrt-very-secret");
    }

    #[test]
    fn spec_sorts_tags_and_reports_drift() {
        let spec = RunnerSpec::new(
            "farm-gfx9-1",
            vec!["b".to_string(), "a".to_string(), "b".to_string()],
            3600,
            RunnerScope::Group(7),
        );
        assert_eq!(spec.tags, vec!["a", "b"]);
        assert_eq!(spec.scope.runner_type(), "group_type");
        let mut d = RunnerDetails {
            id: 1,
            description: "farm-gfx9-1".into(),
            tags: vec!["b".into(), "a".into()],
            maximum_timeout: Some(3600),
            runner_type: None,
            status: None,
        };
        assert!(spec.drift(&d).is_empty());
        d.tags.push("c".into());
        d.maximum_timeout = None;
        let drift = spec.drift(&d);
        assert_eq!(drift.len(), 2, "{drift:?}");
        assert!(drift[0].contains("tags"));
        assert!(drift[1].contains("maximum_timeout"));
    }

    #[tokio::test]
    async fn in_memory_registry_lifecycle() {
        let reg = InMemoryRegistry::new();
        let ep = endpoint();
        let spec = RunnerSpec::new("d", vec!["t".into()], 60, RunnerScope::Instance);
        let r = reg.register(&ep, &spec).await.unwrap();
        assert_eq!(
            reg.verify(&ep, &r.token).await.unwrap(),
            TokenState::Valid {
                runner_id: Some(r.id)
            }
        );
        assert_eq!(reg.details(&ep, r.id).await.unwrap().description, "d");
        reg.set_unreachable(true);
        assert!(reg.verify(&ep, &r.token).await.unwrap_err().is_transient());
        reg.set_unreachable(false);
        reg.remove(&ep, &r.token).await.unwrap();
        assert_eq!(
            reg.verify(&ep, &r.token).await.unwrap(),
            TokenState::Invalid
        );
        assert!(matches!(
            reg.remove(&ep, &r.token).await,
            Err(RegistryError::InvalidToken { .. })
        ));
        let no_reg = RegistryEndpoint {
            registration_token: None,
            ..ep
        };
        assert!(matches!(
            reg.register(&no_reg, &spec).await,
            Err(RegistryError::Misconfigured { .. })
        ));
    }
}
