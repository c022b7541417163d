//! The executor's artifact cache (`EXECUTOR_ARTIFACT_CACHE_ROOT`), on top
//! of [`vivian_cache`].
//!
//! During a job's infrastructure setup (before its DUT is powered, under
//! the job's `infra_setup` timeout), every http(s) artifact of the boot's
//! deployment (kernel, initramfs, device trees) is fetched into the cache,
//! and the DUT is given the executor's own URL for it,
//! `EXECUTOR_URL/artifacts/<key>`, served from the cache with `Range`
//! support by [`routes`]. So a DUT never waits on the origin once setup is
//! done, and a job whose artifacts are fresh in the cache makes no request
//! to the origin at all. A download that fails ends the setup with an
//! infrastructure error naming the URL; the DUT is never booted on a
//! partial file.
//!
//! Without `EXECUTOR_ARTIFACT_CACHE_ROOT`, [`job_boot`] leaves the
//! deployment alone: DUTs download from the origin URLs, as before.
//!
//! `GET /api/v1/artifacts` lists the entries ([`Artifacts::listing`]).
//!
//! Operator settings, besides the folder: `EXECUTOR_ARTIFACT_CACHE_MAX_SIZE`
//! (a size bound, e.g. `20G`; default unbounded) and
//! `EXECUTOR_ARTIFACT_CACHE_MAX_UNUSED_DAYS` (entries unused that long are
//! removed; default 60).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use serde_json::json;
use warp::http::{HeaderValue, StatusCode};
use warp::reply::Response;
use warp::Filter;

use vivian_cache::{ArtifactCache, CacheConfig, CacheError, FetchOutcome, Fetched};
use vivian_core::farm::CancelToken;
use vivian_core::job::{DeploymentState, Timeouts};
use vivian_core::netboot::Deployment as BootDeployment;

/// The cache as the executor uses it: the cache, the base URL DUTs reach
/// the executor at, and the entries each DUT's current job holds.
pub struct Artifacts {
    cache: ArtifactCache,
    base_url: String,
    /// Entries held by the latest job of each DUT (not evicted while held).
    held: Mutex<HashMap<String, Vec<vivian_cache::Pin>>>,
}

impl std::fmt::Debug for Artifacts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Artifacts")
            .field("cache", &self.cache)
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

impl Artifacts {
    /// A cache with `config`, giving DUTs URLs under `executor_url`.
    pub fn new(config: CacheConfig, executor_url: &str) -> anyhow::Result<Artifacts> {
        let root = config.root.clone();
        let cache = ArtifactCache::open(config)
            .with_context(|| format!("EXECUTOR_ARTIFACT_CACHE_ROOT={}", root.display()))?;
        Ok(Artifacts {
            cache,
            base_url: executor_url.trim_end_matches('/').to_string(),
            held: Mutex::new(HashMap::new()),
        })
    }

    /// A cache in `root` with the default settings.
    pub fn open(root: &Path, executor_url: &str) -> anyhow::Result<Artifacts> {
        Artifacts::new(CacheConfig::new(root), executor_url)
    }

    /// The cache of the executor's configuration: `None` when
    /// `EXECUTOR_ARTIFACT_CACHE_ROOT` is not set; bounded by
    /// `EXECUTOR_ARTIFACT_CACHE_MAX_SIZE` and
    /// `EXECUTOR_ARTIFACT_CACHE_MAX_UNUSED_DAYS` (validated with the rest of
    /// the configuration).
    pub fn from_config(
        config: &vivian_core::config::Config,
    ) -> anyhow::Result<Option<Arc<Artifacts>>> {
        let Some(root) = &config.executor_artifact_cache_root else {
            return Ok(None);
        };
        let mut cc = CacheConfig::new(root);
        cc.max_bytes = config.executor_artifact_cache_max_size;
        cc.max_unused = Some(std::time::Duration::from_secs_f64(
            config.executor_artifact_cache_max_unused_days * 86400.0,
        ));
        let a = Artifacts::new(cc, config.executor_url.as_str())?;
        tracing::info!(
            root = %root.display(),
            "artifact cache enabled: DUTs boot from {}/artifacts/<key>",
            a.base_url
        );
        Ok(Some(Arc::new(a)))
    }

    /// The underlying cache.
    pub fn cache(&self) -> &ArtifactCache {
        &self.cache
    }

    /// The URL DUTs download the entry `key` from.
    pub fn url_for(&self, key: &str) -> String {
        format!("{}/artifacts/{key}", self.base_url)
    }

    /// The key of one of our own artifact URLs, if `url` is one.
    fn own_key<'a>(&self, url: &'a str) -> Option<&'a str> {
        let rest = url
            .strip_prefix(&self.base_url)?
            .strip_prefix("/artifacts/")?;
        vivian_cache::is_key(rest).then_some(rest)
    }

    /// Fetches every http(s) artifact of `state` into the cache (at once),
    /// holds them for `dut`'s job, and returns `boot` with the kernel and
    /// initrd URLs replaced by the cache's. Other URLs (relative paths, our
    /// own artifact URLs) are left alone. `progress` gets one line per
    /// artifact.
    pub async fn prepare(
        &self,
        dut: &str,
        state: &DeploymentState,
        mut boot: BootDeployment,
        progress: &(dyn Fn(String) + Send + Sync),
    ) -> Result<BootDeployment, CacheError> {
        let mut urls: Vec<String> = Vec::new();
        let candidates = state
            .kernel
            .url
            .iter()
            .chain(state.initramfs.iter().map(|a| &a.url))
            .chain(state.dtb.iter().map(|a| &a.url));
        for u in candidates {
            let cacheable = (u.starts_with("http://") || u.starts_with("https://"))
                && self.own_key(u).is_none();
            if cacheable && !urls.contains(u) {
                urls.push(u.clone());
            }
        }
        let fetched: Vec<Fetched> =
            futures::future::try_join_all(urls.iter().map(|u| self.cache.fetch(u))).await?;
        let mut map = HashMap::new();
        let mut pins = Vec::new();
        for (orig, f) in urls.iter().zip(&fetched) {
            progress(describe(orig, f));
            pins.push(self.cache.pin(&f.key));
            map.insert(orig.clone(), self.url_for(&f.key));
        }
        // The previous job's entries are released, this one's held.
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(dut.to_string(), pins);
        for slot in [&mut boot.kernel, &mut boot.initrd] {
            if let Some(u) = slot.as_mut() {
                if let Some(local) = map.get(u.as_str()) {
                    *u = local.clone();
                }
            }
        }
        Ok(boot)
    }

    /// `GET /api/v1/artifacts`: the entries, most recently used first, with
    /// the settings and this process's counters.
    pub fn listing(&self) -> Result<serde_json::Value, CacheError> {
        let entries = self.cache.entries()?;
        let total: u64 = entries.iter().map(|e| e.disk_bytes).sum();
        let items: Vec<serde_json::Value> = entries
            .into_iter()
            .map(|e| {
                let mut v = serde_json::to_value(&e).expect("entries serialise");
                v["download_url"] = json!(self.url_for(&e.key));
                v
            })
            .collect();
        let cfg = self.cache.config();
        Ok(json!({
            "enabled": true,
            "root": cfg.root.display().to_string(),
            "max_bytes": cfg.max_bytes,
            "max_unused_days": cfg.max_unused.map(|d| d.as_secs_f64() / 86400.0),
            "total_bytes": total,
            "stats": self.cache.stats(),
            "artifacts": items,
        }))
    }

    /// The answer to `GET`/`HEAD /artifacts/<key>` (with `Range`).
    pub fn respond(
        &self,
        key: &str,
        head: bool,
        range: Option<&str>,
        if_range: Option<&str>,
    ) -> Response {
        let entry = match self.cache.open_entry(key) {
            Ok(Some(e)) => e,
            Ok(None) => {
                return crate::api::ApiError::not_found(format!("No artifact {key} in the cache"))
                    .into_response()
            }
            Err(e) => {
                tracing::error!("artifact cache: {e}");
                return crate::api::ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("artifact {key}: {e}"),
                )
                .into_response();
            }
        };
        match vivian_cache::serve::respond(entry, head, range, if_range) {
            Ok(resp) => {
                let (parts, body) = resp.into_parts();
                let mut r = match body {
                    Some(stream) => warp::Reply::into_response(warp::reply::stream(stream)),
                    None => Response::new(Default::default()),
                };
                *r.status_mut() = parts.status;
                r.headers_mut().extend(parts.headers);
                r
            }
            Err(e) => crate::api::ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("artifact {key}: {e}"),
            )
            .into_response(),
        }
    }
}

/// The TFTP server's source of the kernels and initrds U-Boot fetches
/// (`Boots::set_artifact_fetcher`): our own `/artifacts/<key>` URLs are
/// opened from the cache directly, other URLs are fetched into it first.
#[async_trait::async_trait]
impl vivian_core::netboot::ArtifactFetcher for Artifacts {
    async fn fetch(&self, url: &str) -> Result<std::fs::File, vivian_core::netboot::ArtifactError> {
        let err = |reason: String| vivian_core::netboot::ArtifactError {
            url: url.to_string(),
            reason,
        };
        let key = match self.own_key(url) {
            Some(k) => k.to_string(),
            None => {
                self.cache
                    .fetch(url)
                    .await
                    .map_err(|e| err(e.to_string()))?
                    .key
            }
        };
        match self.cache.open_entry(&key) {
            Ok(Some(entry)) => Ok(entry.file),
            Ok(None) => Err(err(format!("no artifact {key} in the cache"))),
            Err(e) => Err(err(e.to_string())),
        }
    }
}

/// One progress line for a fetched artifact.
fn describe(url: &str, f: &Fetched) -> String {
    let size = human(f.size);
    match &f.outcome {
        FetchOutcome::Hit => format!("Artifact cache: {url} ({size}) is fresh in the cache"),
        FetchOutcome::Revalidated => {
            format!("Artifact cache: {url} ({size}) was confirmed by the origin (304)")
        }
        FetchOutcome::Downloaded { bytes, resumes } => format!(
            "Artifact cache: downloaded {url} ({size}, {} this time{})",
            human(*bytes),
            if *resumes > 0 {
                format!(", resumed {resumes} time(s)")
            } else {
                String::new()
            }
        ),
        FetchOutcome::StaleOriginError { reason } => format!(
            "Artifact cache: the origin of {url} could not be asked ({reason}): using the cached copy ({size})"
        ),
    }
}

fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Why a job's artifact setup failed.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The job was cancelled during the setup.
    #[error("the job was cancelled while its artifacts were being fetched")]
    Cancelled,
    /// The `infra_setup` timeout expired.
    #[error("the infra_setup timeout ({seconds} s) expired while fetching the job's artifacts")]
    TimedOut {
        /// The timeout.
        seconds: f64,
    },
    /// An artifact could not be fetched (the error names its URL).
    #[error(transparent)]
    Cache(#[from] CacheError),
}

impl SetupError {
    /// Whether the setup ended because the job was cancelled.
    pub fn is_cancelled(&self) -> bool {
        matches!(self, SetupError::Cancelled)
    }
}

/// The job engine's call when it publishes a boot's deployment: with a
/// cache, fetches the boot's artifacts (under the job's `infra_setup`
/// timeout, stopped by `cancel`) and returns `boot` pointing at the cache;
/// without one, returns `boot` unchanged.
pub async fn job_boot(
    artifacts: Option<&Arc<Artifacts>>,
    dut: &str,
    state: &DeploymentState,
    boot: BootDeployment,
    timeouts: &Timeouts,
    cancel: &CancelToken,
    progress: &(dyn Fn(String) + Send + Sync),
) -> Result<BootDeployment, SetupError> {
    let Some(a) = artifacts else {
        return Ok(boot);
    };
    let work = a.prepare(dut, state, boot, progress);
    let limit = timeouts.infra_setup.duration();
    tokio::select! {
        _ = cancel.cancelled() => Err(SetupError::Cancelled),
        r = async {
            match limit {
                Some(d) => tokio::time::timeout(d, work)
                    .await
                    .map_err(|_| SetupError::TimedOut { seconds: d.as_secs_f64() })?
                    .map_err(SetupError::from),
                None => work.await.map_err(SetupError::from),
            }
        } => r,
    }
}

/// The DUT-facing route `GET`/`HEAD /artifacts/<key>` (with `Range`),
/// served from the cache `artifacts` returns at request time. Without a
/// cache, or for other paths, it rejects (so the routes mounted after it
/// answer).
pub fn routes<F>(
    artifacts: F,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone + Send + Sync + 'static
where
    F: Fn() -> Option<Arc<Artifacts>> + Clone + Send + Sync + 'static,
{
    warp::path!("artifacts" / String)
        .and(warp::method())
        .and(warp::header::optional::<String>("range"))
        .and(warp::header::optional::<String>("if-range"))
        .and_then(
            move |key: String,
                  method: warp::http::Method,
                  range: Option<String>,
                  if_range: Option<String>| {
                let artifacts = artifacts();
                async move {
                    let Some(a) = artifacts else {
                        return Err(warp::reject::not_found());
                    };
                    let head = method == warp::http::Method::HEAD;
                    if method != warp::http::Method::GET && !head {
                        let mut r = crate::api::ApiError::new(
                            StatusCode::METHOD_NOT_ALLOWED,
                            format!("Method {method} not allowed on /artifacts/{key}"),
                        )
                        .into_response();
                        r.headers_mut()
                            .insert("allow", HeaderValue::from_static("GET, HEAD"));
                        return Ok(r);
                    }
                    Ok(a.respond(&key, head, range.as_deref(), if_range.as_deref()))
                }
            },
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes() {
        assert_eq!(human(10), "10 B");
        assert_eq!(human(64 << 20), "64.0 MiB");
    }
}
