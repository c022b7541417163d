//! # vivian-cache
//!
//! The artifact cache of the executor (`EXECUTOR_ARTIFACT_CACHE_ROOT`): job
//! kernels, initrds and other boot artifacts are downloaded once from their
//! origin into a local folder, and the DUTs are served the local copy.
//!
//! - **HTTP caching semantics** (RFC 7234/9111) come from the
//!   `http-cache-semantics` crate: `Cache-Control`, `Expires`, heuristic
//!   freshness from `Last-Modified`, and revalidation of stale entries with
//!   conditional requests (`If-None-Match`, `If-Modified-Since`); a `304`
//!   refreshes the entry without a download.
//! - **Resumable downloads**: a transfer that breaks mid-body is resumed with
//!   `Range` + `If-Range` from the bytes already on disk (also after a restart
//!   of the process), up to [`CacheConfig::attempts`] requests.
//! - **Single flight**: concurrent fetches of one URL in a process share one
//!   download; several processes (executors, restarts) sharing the folder are
//!   serialised per entry by an advisory file lock (`flock`).
//! - **Atomic publish**: a body is written to a temporary file, synced, and
//!   published by renaming the entry's metadata into place; a half-written
//!   or truncated entry is never served.
//! - **Bounds**: a total size and an unused-age bound, enforced by evicting
//!   the least recently used entries that no job holds ([`Pin`]).
//! - **Stale on error**: when the origin is down, a stale entry that the
//!   origin did not mark `must-revalidate`/`no-cache` is still used (with a
//!   warning), so a farm keeps booting through short origin outages.
//!
//! The [`serve`] module answers HTTP `GET`/`HEAD` with `Range` for an entry;
//! the executor mounts it at `EXECUTOR_URL/artifacts/<key>`.
//!
//! ## Layout of the folder
//!
//! ```text
//! <root>/VIVIAN-CACHE                   marker with the layout version
//! <root>/locks/<key>.lock                one lock file per entry (never deleted)
//! <root>/entries/<key[0..2]>/<key>/meta.json     the published entry
//!                                  .../body-<gen>   its body (named by meta.json)
//!                                  .../partial      a download in progress
//!                                  .../partial.json what is needed to resume it
//! ```
//!
//! `<key>` is the first 128 bits of the SHA-256 of the normalised URL, in
//! hexadecimal. The last use of an entry is the modification time of its
//! body file (set on every fetch and every serve).

#![warn(missing_docs)]

mod fetch;
pub mod serve;
mod store;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;

pub use store::EntryFile;

/// Settings of an [`ArtifactCache`].
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// The cache folder (`EXECUTOR_ARTIFACT_CACHE_ROOT`); created if needed.
    pub root: PathBuf,
    /// Bound on the total size of the entries (bodies and partial downloads).
    /// `None`: unbounded.
    pub max_bytes: Option<u64>,
    /// Entries unused for longer than this are removed. `None`: kept forever.
    pub max_unused: Option<Duration>,
    /// Requests one fetch may make before giving up (the first one included;
    /// every resume of a broken transfer and every retry counts).
    pub attempts: u32,
    /// Pause before a retry that follows a request that made no progress.
    pub retry_delay: Duration,
    /// TCP connection timeout to the origin.
    pub connect_timeout: Duration,
    /// A transfer receiving nothing for this long counts as broken.
    pub stall_timeout: Duration,
    /// Use a stale entry when the origin cannot be reached or answers with a
    /// server error (unless the entry says `must-revalidate` or `no-cache`).
    pub serve_stale_on_error: bool,
}

impl CacheConfig {
    /// The defaults: unbounded size, entries unused for 60 days removed,
    /// 6 attempts 2 s apart, 10 s connect and 30 s stall timeouts, stale
    /// entries used when the origin is down.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        CacheConfig {
            root: root.into(),
            max_bytes: None,
            max_unused: Some(Duration::from_secs(60 * 24 * 3600)),
            attempts: 6,
            retry_delay: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(30),
            serve_stale_on_error: true,
        }
    }
}

/// Why an artifact could not be fetched or the cache used. Every variant
/// about a download names its URL.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The URL is not an absolute http(s) URL.
    #[error("{url:?} is not an http(s) URL: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// The origin could not be reached (after every attempt).
    #[error("cannot download {url}: {reason}")]
    Unreachable {
        /// The artifact's URL.
        url: String,
        /// The last failure.
        reason: String,
    },
    /// The origin answered with an error status.
    #[error("cannot download {url}: the origin answered HTTP {status}")]
    Status {
        /// The artifact's URL.
        url: String,
        /// The HTTP status.
        status: u16,
    },
    /// The transfer kept breaking and the attempts ran out.
    #[error(
        "cannot download {url}: the transfer broke and {attempts} attempts were used \
         ({received} bytes received{}): {reason}",
        expected.map(|e| format!(" of {e}")).unwrap_or_default()
    )]
    Interrupted {
        /// The artifact's URL.
        url: String,
        /// Requests made.
        attempts: u32,
        /// Bytes on disk.
        received: u64,
        /// The size announced by the origin, if any.
        expected: Option<u64>,
        /// The last failure.
        reason: String,
    },
    /// The origin sent something inconsistent (more bytes than announced, a
    /// range that does not match the request...). The partial data is
    /// discarded.
    #[error("corrupt download of {url}: {reason}")]
    Corrupt {
        /// The artifact's URL.
        url: String,
        /// What is inconsistent.
        reason: String,
    },
    /// The cache folder could not be read or written.
    #[error("{}artifact cache folder {}: {source}", url.as_ref().map(|u| format!("{u}: ")).unwrap_or_default(), path.display())]
    Io {
        /// The artifact being fetched, if any.
        url: Option<String>,
        /// The file or folder.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl CacheError {
    /// The URL the error is about, if any.
    pub fn url(&self) -> Option<&str> {
        match self {
            CacheError::InvalidUrl { url, .. }
            | CacheError::Unreachable { url, .. }
            | CacheError::Status { url, .. }
            | CacheError::Interrupted { url, .. }
            | CacheError::Corrupt { url, .. } => Some(url),
            CacheError::Io { url, .. } => url.as_deref(),
        }
    }

    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        CacheError::Io {
            url: None,
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn with_url(mut self, u: &str) -> Self {
        if let CacheError::Io { url, .. } = &mut self {
            if url.is_none() {
                *url = Some(u.to_string());
            }
        }
        self
    }
}

/// How a fetch was satisfied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum FetchOutcome {
    /// The entry was fresh: no request was made.
    Hit,
    /// The entry was stale and the origin confirmed it (`304`).
    Revalidated,
    /// The body was downloaded (new entry, or the origin had a new version).
    Downloaded {
        /// Bytes received from the origin for this fetch.
        bytes: u64,
        /// Broken transfers resumed with `Range`.
        resumes: u32,
    },
    /// The entry was stale and the origin could not be asked: the stale
    /// copy is used.
    StaleOriginError {
        /// Why the origin could not confirm it.
        reason: String,
    },
}

/// A fetched artifact, ready to be served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Fetched {
    /// The entry's key (what `/artifacts/<key>` names).
    pub key: String,
    /// The normalised URL.
    pub url: String,
    /// Body size in bytes.
    pub size: u64,
    /// How it was obtained.
    pub outcome: FetchOutcome,
}

/// Whether an entry can be used without asking the origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ValidationState {
    /// Fresh: used without a request.
    Fresh,
    /// Stale: the next fetch revalidates it.
    Stale,
    /// Only a partial download exists (it will be resumed).
    Partial,
}

/// One entry, as listed by [`ArtifactCache::entries`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EntryInfo {
    /// The key.
    pub key: String,
    /// The origin URL.
    pub url: String,
    /// Body size in bytes (bytes received so far for a partial download).
    pub size: u64,
    /// Bytes the entry takes in the folder (body and partial download).
    pub disk_bytes: u64,
    /// Fresh, stale or partial.
    pub state: ValidationState,
    /// Seconds the entry stays fresh (0 when stale or partial).
    pub fresh_for_seconds: u64,
    /// Last time a job fetched it or a DUT downloaded it.
    pub last_used: chrono::DateTime<chrono::Utc>,
    /// When its body was downloaded.
    pub fetched_at: Option<chrono::DateTime<chrono::Utc>>,
    /// When the origin last confirmed it (download or `304`).
    pub validated_at: Option<chrono::DateTime<chrono::Utc>>,
    /// The origin's `ETag`, if any.
    pub etag: Option<String>,
    /// The origin's `Last-Modified`, if any.
    pub last_modified: Option<String>,
    /// The origin's `Content-Type`, if any.
    pub content_type: Option<String>,
    /// Broken transfers resumed while downloading the body.
    pub resumes: u32,
    /// Whether a running job holds it (it is not evicted).
    pub pinned: bool,
}

/// What [`ArtifactCache::evict`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct EvictReport {
    /// Keys removed.
    pub removed: Vec<String>,
    /// Bytes freed.
    pub bytes_freed: u64,
    /// Bytes left in the cache.
    pub bytes_left: u64,
}

/// Counters of one [`ArtifactCache`] (this process only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Fetches answered from a fresh entry, without a request.
    pub hits: u64,
    /// Fetches answered by a `304` revalidation.
    pub revalidations: u64,
    /// Bodies downloaded (complete).
    pub downloads: u64,
    /// Broken transfers resumed with `Range`.
    pub resumes: u64,
    /// Fetches that used a stale entry because the origin failed.
    pub stale_served: u64,
    /// Body bytes received from origins.
    pub bytes_downloaded: u64,
    /// Fetches that failed.
    pub errors: u64,
    /// Entries evicted.
    pub evictions: u64,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    revalidations: AtomicU64,
    downloads: AtomicU64,
    resumes: AtomicU64,
    stale_served: AtomicU64,
    bytes_downloaded: AtomicU64,
    errors: AtomicU64,
    evictions: AtomicU64,
}

pub(crate) struct Inner {
    config: CacheConfig,
    store: store::Store,
    client: reqwest::Client,
    /// One async mutex per key being fetched: the single flight.
    flights: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Keys held by running jobs, with their holder counts.
    pins: Mutex<HashMap<String, usize>>,
    counters: Counters,
}

/// The artifact cache. Cheap to clone (an `Arc`); every clone shares the
/// single-flight table, the pins and the counters.
#[derive(Clone)]
pub struct ArtifactCache {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ArtifactCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArtifactCache")
            .field("root", &self.inner.config.root)
            .field("max_bytes", &self.inner.config.max_bytes)
            .finish_non_exhaustive()
    }
}

/// Keeps an entry from being evicted while a job uses it. Dropping it
/// releases the entry.
pub struct Pin {
    inner: Arc<Inner>,
    key: String,
}

impl std::fmt::Debug for Pin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Pin").field(&self.key).finish()
    }
}

impl Pin {
    /// The pinned key.
    pub fn key(&self) -> &str {
        &self.key
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut pins = self.inner.pins.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = pins.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                pins.remove(&self.key);
            }
        }
    }
}

/// Normalises an artifact URL (absolute http or https, fragment dropped)
/// and returns it with its cache key.
pub fn key_for(url: &str) -> Result<(String, String), CacheError> {
    use sha2::Digest;
    let invalid = |reason: String| CacheError::InvalidUrl {
        url: url.to_string(),
        reason,
    };
    let mut parsed = url::Url::parse(url.trim()).map_err(|e| invalid(e.to_string()))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(invalid(format!(
            "the scheme {:?} is not supported",
            parsed.scheme()
        )));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(invalid("no host".into()));
    }
    parsed.set_fragment(None);
    let normalised = parsed.to_string();
    // http::Uri must accept it too (it is stricter than the URL parser).
    normalised
        .parse::<http::Uri>()
        .map_err(|e| invalid(e.to_string()))?;
    let digest = sha2::Sha256::digest(normalised.as_bytes());
    let key: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    Ok((normalised, key))
}

/// Whether `key` has the shape of a cache key (32 lower-case hex digits).
pub fn is_key(key: &str) -> bool {
    key.len() == 32 && key.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl ArtifactCache {
    /// Opens (creating it if needed) the cache folder of `config`.
    pub fn open(config: CacheConfig) -> Result<Self, CacheError> {
        let store = store::Store::open(&config.root)?;
        // Without CA certificates the cache still serves http origins (the
        // fallback of vivian_core::http_client; https ones then fail naming
        // the URL).
        let (client, _roots) = vivian_core::http_client::build_with("artifact cache", || {
            vivian_core::http_client::builder()
                .connect_timeout(config.connect_timeout)
                .read_timeout(config.stall_timeout)
                .user_agent(concat!("vivian-cache/", env!("CARGO_PKG_VERSION")))
        })
        .map_err(|e| {
            CacheError::io(
                &config.root,
                std::io::Error::other(format!("cannot create the HTTP client: {e}")),
            )
        })?;
        let cache = ArtifactCache {
            inner: Arc::new(Inner {
                config,
                store,
                client,
                flights: Mutex::new(HashMap::new()),
                pins: Mutex::new(HashMap::new()),
                counters: Counters::default(),
            }),
        };
        // Apply the bounds to what previous runs left.
        if let Err(e) = cache.evict() {
            tracing::warn!("artifact cache: eviction at start-up failed: {e}");
        }
        Ok(cache)
    }

    /// The cache's settings.
    pub fn config(&self) -> &CacheConfig {
        &self.inner.config
    }

    /// Makes sure a usable copy of `url` is in the cache and returns it:
    /// a fresh entry is used as is, a stale one is revalidated, a missing
    /// one downloaded (resuming a partial download if one exists).
    /// Concurrent calls for one URL share the work. Entries past the size
    /// or age bounds are evicted after a download.
    pub async fn fetch(&self, url: &str) -> Result<Fetched, CacheError> {
        let (url, key) = key_for(url)?;
        let flight = {
            let mut f = self.inner.flights.lock().unwrap_or_else(|e| e.into_inner());
            f.entry(key.clone()).or_default().clone()
        };
        let result = {
            let _one = flight.lock().await;
            let lock = self
                .inner
                .store
                .lock_entry(&key)
                .await
                .map_err(|e| e.with_url(&url))?;
            let r = fetch::fetch_locked(&self.inner, &url, &key).await;
            if r.is_err() {
                // A failure before any byte leaves no empty entry behind.
                self.inner.store.remove_if_empty(&key);
            }
            drop(lock);
            r
        };
        {
            let mut f = self.inner.flights.lock().unwrap_or_else(|e| e.into_inner());
            // Ours and the table's: nobody else waits on it.
            if Arc::strong_count(&flight) == 2 {
                f.remove(&key);
            }
        }
        let c = &self.inner.counters;
        match &result {
            Ok(f) => {
                match &f.outcome {
                    FetchOutcome::Hit => c.hits.fetch_add(1, Ordering::Relaxed),
                    FetchOutcome::Revalidated => c.revalidations.fetch_add(1, Ordering::Relaxed),
                    FetchOutcome::StaleOriginError { .. } => {
                        c.stale_served.fetch_add(1, Ordering::Relaxed)
                    }
                    FetchOutcome::Downloaded { .. } => c.downloads.fetch_add(1, Ordering::Relaxed),
                };
                if matches!(f.outcome, FetchOutcome::Downloaded { .. }) {
                    // Keep the entry just fetched while evicting.
                    let _pin = self.pin(&f.key);
                    if let Err(e) = self.evict() {
                        tracing::warn!("artifact cache: eviction failed: {e}");
                    }
                }
            }
            Err(_) => {
                c.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        result
    }

    /// Pins `key`: it is not evicted until the returned guard is dropped.
    pub fn pin(&self, key: &str) -> Pin {
        let mut pins = self.inner.pins.lock().unwrap_or_else(|e| e.into_inner());
        *pins.entry(key.to_string()).or_insert(0) += 1;
        Pin {
            inner: self.inner.clone(),
            key: key.to_string(),
        }
    }

    /// Opens the published body of `key` for serving (and records the use).
    /// `None` for an unknown key, a partial download or a damaged entry:
    /// only a complete, published body is ever returned.
    pub fn open_entry(&self, key: &str) -> Result<Option<EntryFile>, CacheError> {
        if !is_key(key) {
            return Ok(None);
        }
        self.inner.store.open_body(key)
    }

    /// Every entry of the folder (published or partial), most recently used
    /// first.
    pub fn entries(&self) -> Result<Vec<EntryInfo>, CacheError> {
        let pins: Vec<String> = self
            .inner
            .pins
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        let mut v = self.inner.store.list(SystemTime::now(), &pins)?;
        v.sort_by_key(|e| std::cmp::Reverse(e.last_used));
        Ok(v)
    }

    /// Applies the bounds: removes entries unused for longer than
    /// `max_unused`, then the least recently used ones until the total is
    /// within `max_bytes`. Pinned entries and entries another fetch holds
    /// are skipped (the bound is then exceeded until they are released).
    pub fn evict(&self) -> Result<EvictReport, CacheError> {
        let pins: Vec<String> = self
            .inner
            .pins
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        let r = self.inner.store.evict(
            SystemTime::now(),
            self.inner.config.max_bytes,
            self.inner.config.max_unused,
            &pins,
        )?;
        self.inner
            .counters
            .evictions
            .fetch_add(r.removed.len() as u64, Ordering::Relaxed);
        for k in &r.removed {
            tracing::info!(key = %k, "artifact cache: evicted");
        }
        Ok(r)
    }

    /// The counters of this process.
    pub fn stats(&self) -> Stats {
        let c = &self.inner.counters;
        Stats {
            hits: c.hits.load(Ordering::Relaxed),
            revalidations: c.revalidations.load(Ordering::Relaxed),
            downloads: c.downloads.load(Ordering::Relaxed),
            resumes: c.resumes.load(Ordering::Relaxed),
            stale_served: c.stale_served.load(Ordering::Relaxed),
            bytes_downloaded: c.bytes_downloaded.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            evictions: c.evictions.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stable_and_urls_normalised() {
        let (u, k) = key_for("http://Example.org:80/a/../k?x=1#frag").unwrap();
        assert_eq!(u, "http://example.org/k?x=1");
        assert!(is_key(&k), "{k}");
        assert_eq!(key_for("http://example.org/k?x=1").unwrap().1, k);
        assert_ne!(key_for("http://example.org/k?x=2").unwrap().1, k);
        for bad in [
            "ftp://h/k",
            "/local/path",
            "http://",
            "file:///etc/passwd",
            "",
        ] {
            let e = key_for(bad).unwrap_err();
            assert!(matches!(e, CacheError::InvalidUrl { .. }), "{bad}: {e}");
            assert_eq!(e.url(), Some(bad));
        }
        assert!(!is_key("../../etc/passwd"));
        assert!(!is_key(&k.to_uppercase()));
    }
}
