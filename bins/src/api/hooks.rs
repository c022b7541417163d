//! Optional hooks through which services outside the farm take part in the
//! API: the GitLab runners of a DUT ([`RunnerHook`]) and where its console
//! can be followed ([`LogsSource`]). An embedder installs the ones it has
//! ([`super::ApiState::with_runner_hook`], [`super::ApiState::with_logs_source`]);
//! without them the DUT object simply lacks the members they add.
//!
//! Reads never call these services: the hooks answer from memory, and the
//! rendered DUT objects are cached until their [`RunnerHook::version`] or
//! [`LogsSource::version`] changes.

use async_trait::async_trait;
use serde::Serialize;
use serde_json::Value;
use vivian_core::marsdb::{Dut, MacAddr};

/// The GitLab runners of the DUTs, for `GET /api/v1/dut/<id>` (member
/// `gitlab_runners`: the runner state on each instance) and `DELETE
/// /api/v1/dut/<id>` (the DUT's runners are removed before the answer).
///
/// Implemented by [`vivian_gitlab::Reconciler`].
#[async_trait]
pub trait RunnerHook: Send + Sync + 'static {
    /// A counter that changes whenever [`RunnerHook::dut_runners`] may
    /// answer differently. Called on every read: it must be cheap (an
    /// atomic load).
    fn version(&self) -> u64;

    /// The runner state of DUT `id` on each GitLab instance, as a JSON
    /// object keyed by instance name (`{}` when it has none). Must never
    /// contain a runner token.
    fn dut_runners(&self, id: &MacAddr) -> Value;

    /// Removes every runner of DUT `id`, which was just removed from
    /// MarsDB through the API; `removed` is its record from just before
    /// the removal. Removals GitLab could not be reached for are the
    /// implementation's to retry.
    async fn dut_removed(&self, id: &MacAddr, removed: Option<&Dut>) -> RunnerRemoval;
}

/// The outcome of [`RunnerHook::dut_removed`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunnerRemoval {
    /// Instances the DUT's runner is gone from.
    pub removed: Vec<String>,
    /// Instances where the removal failed for now, with the reason (to be
    /// retried by the hook).
    pub retrying: Vec<(String, String)>,
}

#[async_trait]
impl RunnerHook for vivian_gitlab::Reconciler {
    fn version(&self) -> u64 {
        self.status_version()
    }

    fn dut_runners(&self, id: &MacAddr) -> Value {
        serde_json::to_value(self.dut_status(id))
            .unwrap_or_else(|_| Value::Object(Default::default()))
    }

    async fn dut_removed(&self, id: &MacAddr, removed: Option<&Dut>) -> RunnerRemoval {
        let r = self.remove_runners_of(id, removed).await;
        RunnerRemoval {
            removed: r.removed,
            retrying: r.retrying,
        }
    }
}

/// Where the console of a DUT can be followed read-only: the member
/// `logs_endpoint` of the DUT object (EX A.1: `{"host": ..., "port": ...}`,
/// SALAD's `tcp_port_logs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogsEndpoint {
    /// Host to connect to.
    pub host: String,
    /// TCP port of the read-only console stream.
    pub port: u16,
}

/// The console log endpoints of the DUTs (see [`super::ConsoleLogs`], which
/// follows a SALAD service).
pub trait LogsSource: Send + Sync + 'static {
    /// A counter that changes whenever [`LogsSource::logs_endpoint`] may
    /// answer differently. Called on every read: it must be cheap.
    fn version(&self) -> u64;

    /// The endpoint of DUT `id`'s console, if the console service knows
    /// it (the member is then present in the DUT object).
    fn logs_endpoint(&self, id: &MacAddr) -> Option<LogsEndpoint>;
}
