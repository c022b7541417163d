//! # vivian-gitlab
//!
//! Exposes a farm's DUTs (and its gateway) as GitLab CI runners:
//!
//! * [`GitlabClient`]: the [`RunnerRegistry`](vivian_core::runner::RunnerRegistry)
//!   implementation over GitLab's REST API (runner creation with
//!   `POST /api/v4/user/runners`, verification, details, removal), with
//!   timeouts and retries;
//! * [`Reconciler`]: keeps MarsDB's runners registered, writes tokens back,
//!   removes the runners of deleted DUTs, and keeps gitlab-runner's
//!   `config.toml` in step, at start-up, on every MarsDB change and every
//!   30 minutes;
//! * [`RunnerConfigWriter`]: renders `config.toml` from a minijinja template
//!   (the built-in [`DEFAULT_TEMPLATE`] or `GITLAB_CONF_TEMPLATE_FILE`) and
//!   writes it atomically when it changes.
//!
//! See the crate's README for connecting a farm to a GitLab instance.

#![warn(missing_docs)]

pub mod client;
pub mod config;
pub mod reconcile;

pub use client::{GitlabClient, GitlabClientOptions};
pub use config::{
    gateway_tags, job_environment, write_if_changed, GatewayLimits, HostResources,
    RunnerConfigEntry, RunnerConfigError, RunnerConfigInput, RunnerConfigWriter, TemplateSource,
    DEFAULT_TEMPLATE,
};
pub use reconcile::{
    DutRunnerStatus, ReconcileError, ReconcileReport, Reconciler, ReconcilerSettings,
    RemovalReport, RunnerStatus,
};
