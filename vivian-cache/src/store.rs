//! The on-disk half of the cache: layout, metadata, atomic publish, locks,
//! listing and eviction. Everything here is synchronous file-system work
//! (small files and renames), except the lock wait.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use http_cache_semantics::CachePolicy;
use serde::{Deserialize, Serialize};

use crate::{CacheError, EntryInfo, EvictReport, ValidationState};

/// Version of the folder layout, in the `VIVIAN-CACHE` marker.
const LAYOUT: &str = "vivian-cache layout 1\n";

/// The published metadata of an entry (`meta.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Meta {
    pub url: String,
    /// File name of the body in the entry folder.
    pub body: String,
    pub size: u64,
    pub policy: CachePolicy,
    pub fetched_at: SystemTime,
    pub validated_at: SystemTime,
    pub resumes: u32,
    pub content_type: Option<String>,
    pub etag: Option<String>,
    pub last_modified: Option<String>,
    /// The response's `Cache-Control`, for the stale-on-error decision.
    pub cache_control: Option<String>,
}

impl Meta {
    /// Whether the origin allows using this entry stale when it cannot be
    /// asked.
    pub fn may_serve_stale(&self) -> bool {
        if !self.policy.is_storable() {
            return false;
        }
        let cc = self
            .cache_control
            .as_deref()
            .unwrap_or("")
            .to_ascii_lowercase();
        ![
            "must-revalidate",
            "proxy-revalidate",
            "no-cache",
            "no-store",
        ]
        .iter()
        .any(|d| cc.contains(d))
    }
}

/// What is needed to resume a download (`partial.json`), written before the
/// first body byte.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Partial {
    pub url: String,
    /// The headers of the `200` response the body comes from.
    pub headers: Vec<(String, String)>,
    /// When that response was received.
    pub response_time: SystemTime,
    /// The strong validator for `If-Range` (an `ETag`, else `Last-Modified`).
    pub validator: Option<String>,
    /// The full size, when the origin announced it.
    pub total: Option<u64>,
    /// Resumes so far.
    pub resumes: u32,
}

/// An open, complete body, ready to be served.
#[derive(Debug)]
pub struct EntryFile {
    /// The body, positioned at its start.
    pub file: File,
    /// Its size.
    pub size: u64,
    /// The origin URL.
    pub url: String,
    /// The origin's `Content-Type`, if any.
    pub content_type: Option<String>,
    /// A strong validator of this body for DUT requests (`If-Range`).
    pub etag: String,
    /// The origin's `Last-Modified`, if any.
    pub last_modified: Option<String>,
}

pub(crate) struct Store {
    root: PathBuf,
}

/// Holds an entry's lock file locked; dropping it unlocks.
pub(crate) struct EntryLock {
    _file: File,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CacheError + '_ {
    move |e| CacheError::io(path, e)
}

/// Writes `data` to `path` atomically: a temporary file in the same folder,
/// synced, then renamed over `path`, and the folder synced.
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> Result<(), CacheError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    let r = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if r.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    r.map_err(io_err(path))
}

pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn to_utc(t: SystemTime) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::<chrono::Utc>::from(t)
}

impl Store {
    pub fn open(root: &Path) -> Result<Store, CacheError> {
        for d in [root.to_path_buf(), root.join("locks"), root.join("entries")] {
            fs::create_dir_all(&d).map_err(io_err(&d))?;
        }
        let marker = root.join("VIVIAN-CACHE");
        match fs::read_to_string(&marker) {
            Ok(s) if s == LAYOUT => {}
            Ok(s) => {
                return Err(CacheError::io(
                    &marker,
                    io::Error::other(format!(
                        "unknown cache layout {:?} (expected {:?}): use another folder",
                        s.trim(),
                        LAYOUT.trim()
                    )),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                write_atomic(&marker, LAYOUT.as_bytes())?;
            }
            Err(e) => return Err(CacheError::io(&marker, e)),
        }
        Ok(Store {
            root: root.to_path_buf(),
        })
    }

    pub fn entry_dir(&self, key: &str) -> PathBuf {
        self.root.join("entries").join(&key[..2]).join(key)
    }

    fn lock_path(&self, key: &str) -> PathBuf {
        self.root.join("locks").join(format!("{key}.lock"))
    }

    fn open_lock(&self, key: &str) -> Result<File, CacheError> {
        let p = self.lock_path(key);
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(io_err(&p))
    }

    /// Takes the entry's exclusive lock, waiting (polling, so the wait can
    /// be cancelled by dropping the future) while another process has it.
    pub async fn lock_entry(&self, key: &str) -> Result<EntryLock, CacheError> {
        let f = self.open_lock(key)?;
        let mut delay = Duration::from_millis(5);
        loop {
            match fs4::FileExt::try_lock(&f) {
                Ok(()) => return Ok(EntryLock { _file: f }),
                Err(fs4::TryLockError::WouldBlock) => {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_millis(100));
                }
                Err(fs4::TryLockError::Error(e)) => {
                    return Err(CacheError::io(&self.lock_path(key), e))
                }
            }
        }
    }

    /// The entry's lock if nobody holds it.
    fn try_lock_entry(&self, key: &str) -> Option<EntryLock> {
        let f = self.open_lock(key).ok()?;
        fs4::FileExt::try_lock(&f).ok()?;
        Some(EntryLock { _file: f })
    }

    /// The published metadata of `key`, if its body is complete. A missing,
    /// unreadable or inconsistent entry reads as absent (it is downloaded
    /// again).
    pub fn read_meta(&self, key: &str) -> Option<Meta> {
        let dir = self.entry_dir(key);
        let text = fs::read(dir.join("meta.json")).ok()?;
        let meta: Meta = match serde_json::from_slice(&text) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(
                    key,
                    "artifact cache: unreadable meta.json ({e}): entry ignored"
                );
                return None;
            }
        };
        match fs::metadata(dir.join(&meta.body)) {
            Ok(m) if m.is_file() && m.len() == meta.size => Some(meta),
            Ok(m) => {
                tracing::warn!(
                    key,
                    "artifact cache: body of {} has {} bytes, {} expected: entry ignored",
                    meta.url,
                    m.len(),
                    meta.size
                );
                None
            }
            Err(_) => None,
        }
    }

    /// Rewrites the metadata of an entry whose body does not change.
    pub fn write_meta(&self, key: &str, meta: &Meta) -> Result<(), CacheError> {
        let dir = self.entry_dir(key);
        let json = serde_json::to_vec_pretty(meta).expect("metadata serialises");
        write_atomic(&dir.join("meta.json"), &json)
    }

    pub fn partial_path(&self, key: &str) -> PathBuf {
        self.entry_dir(key).join("partial")
    }

    /// The resume state of `key` and the bytes of its partial body, if both
    /// exist and agree.
    pub fn read_partial(&self, key: &str, url: &str) -> Option<(Partial, u64)> {
        let dir = self.entry_dir(key);
        let p: Partial = serde_json::from_slice(&fs::read(dir.join("partial.json")).ok()?).ok()?;
        let len = fs::metadata(dir.join("partial")).ok()?.len();
        if p.url != url || p.total.is_some_and(|t| len > t) {
            return None;
        }
        Some((p, len))
    }

    pub fn write_partial(&self, key: &str, p: &Partial) -> Result<(), CacheError> {
        let dir = self.entry_dir(key);
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let json = serde_json::to_vec_pretty(p).expect("resume state serialises");
        write_atomic(&dir.join("partial.json"), &json)
    }

    pub fn discard_partial(&self, key: &str) {
        let dir = self.entry_dir(key);
        let _ = fs::remove_file(dir.join("partial.json"));
        let _ = fs::remove_file(dir.join("partial"));
    }

    /// Publishes the synced partial body as the entry's body: rename it to
    /// a new body file, then switch `meta.json` to it (the atomic step),
    /// then remove the previous body and the resume state.
    pub fn publish(&self, key: &str, mut meta: Meta) -> Result<Meta, CacheError> {
        let dir = self.entry_dir(key);
        let old = self.read_meta(key).map(|m| m.body);
        let stamp = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let body = format!("body-{stamp:x}-{}", std::process::id());
        let body_path = dir.join(&body);
        fs::rename(dir.join("partial"), &body_path).map_err(io_err(&body_path))?;
        sync_dir(&dir).map_err(io_err(&dir))?;
        meta.body = body;
        self.write_meta(key, &meta)?;
        if let Some(old) = old.filter(|o| *o != meta.body) {
            let _ = fs::remove_file(dir.join(old));
        }
        let _ = fs::remove_file(dir.join("partial.json"));
        // Body files no metadata names (left by a crash between the steps
        // above) are garbage.
        if let Ok(rd) = fs::read_dir(&dir) {
            for e in rd.flatten() {
                let name = e.file_name();
                let name = name.to_string_lossy();
                if name.starts_with("body-") && name != meta.body {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        Ok(meta)
    }

    /// Removes the folder of `key` if nothing is in it.
    pub fn remove_if_empty(&self, key: &str) {
        let _ = fs::remove_dir(self.entry_dir(key));
    }

    /// Records a use of `key` now (the body file's modification time).
    pub fn touch(&self, key: &str, meta: &Meta) {
        let p = self.entry_dir(key).join(&meta.body);
        if let Ok(f) = OpenOptions::new().write(true).open(&p) {
            let _ = f.set_modified(SystemTime::now());
        }
    }

    pub fn open_body(&self, key: &str) -> Result<Option<EntryFile>, CacheError> {
        // The metadata may be switched between reading it and opening the
        // body it names: read again then.
        for _ in 0..3 {
            let Some(meta) = self.read_meta(key) else {
                return Ok(None);
            };
            let p = self.entry_dir(key).join(&meta.body);
            let file = match File::open(&p) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(CacheError::io(&p, e).with_url(&meta.url)),
            };
            let size = file.metadata().map_err(io_err(&p))?.len();
            if size != meta.size {
                return Ok(None);
            }
            self.touch(key, &meta);
            return Ok(Some(EntryFile {
                file,
                size,
                etag: format!("\"{key}-{}\"", meta.body.trim_start_matches("body-")),
                url: meta.url,
                content_type: meta.content_type,
                last_modified: meta.last_modified,
            }));
        }
        Ok(None)
    }

    /// Every entry folder: `(key, folder)`.
    fn entry_dirs(&self) -> Result<Vec<(String, PathBuf)>, CacheError> {
        let top = self.root.join("entries");
        let mut out = Vec::new();
        for shard in fs::read_dir(&top).map_err(io_err(&top))?.flatten() {
            let Ok(rd) = fs::read_dir(shard.path()) else {
                continue;
            };
            for e in rd.flatten() {
                let key = e.file_name().to_string_lossy().into_owned();
                if crate::is_key(&key) {
                    out.push((key, e.path()));
                }
            }
        }
        Ok(out)
    }

    /// Size on disk, last use and listing of one entry folder.
    fn describe(&self, key: &str, dir: &Path, now: SystemTime, pinned: bool) -> Option<EntryInfo> {
        let mut disk_bytes = 0u64;
        let mut newest = None::<SystemTime>;
        if let Ok(rd) = fs::read_dir(dir) {
            for e in rd.flatten() {
                if let Ok(m) = e.metadata() {
                    disk_bytes += m.len();
                    let name = e.file_name();
                    let name = name.to_string_lossy();
                    if name.starts_with("body-") || name == "partial" {
                        let t = m.modified().ok();
                        newest = newest.max(t);
                    }
                }
            }
        }
        let dir_time = fs::metadata(dir).and_then(|m| m.modified()).ok();
        let last_used = newest.or(dir_time).unwrap_or(now);
        if let Some(meta) = self.read_meta(key) {
            let ttl = meta.policy.time_to_live(now);
            let stale = meta.policy.is_stale(now) || !meta.policy.is_storable();
            return Some(EntryInfo {
                key: key.to_string(),
                url: meta.url,
                size: meta.size,
                disk_bytes,
                state: if stale {
                    ValidationState::Stale
                } else {
                    ValidationState::Fresh
                },
                fresh_for_seconds: if stale { 0 } else { ttl.as_secs() },
                last_used: to_utc(last_used),
                fetched_at: Some(to_utc(meta.fetched_at)),
                validated_at: Some(to_utc(meta.validated_at)),
                etag: meta.etag,
                last_modified: meta.last_modified,
                content_type: meta.content_type,
                resumes: meta.resumes,
                pinned,
            });
        }
        let partial: Option<Partial> = fs::read(dir.join("partial.json"))
            .ok()
            .and_then(|t| serde_json::from_slice(&t).ok());
        if partial.is_none() && disk_bytes == 0 {
            // An empty folder (a fetch that failed or is starting).
            return None;
        }
        let size = fs::metadata(dir.join("partial"))
            .map(|m| m.len())
            .unwrap_or(0);
        Some(EntryInfo {
            key: key.to_string(),
            url: partial.as_ref().map(|p| p.url.clone()).unwrap_or_default(),
            size,
            disk_bytes,
            state: ValidationState::Partial,
            fresh_for_seconds: 0,
            last_used: to_utc(last_used),
            fetched_at: None,
            validated_at: None,
            etag: None,
            last_modified: None,
            content_type: None,
            resumes: partial.map(|p| p.resumes).unwrap_or(0),
            pinned,
        })
    }

    pub fn list(&self, now: SystemTime, pins: &[String]) -> Result<Vec<EntryInfo>, CacheError> {
        Ok(self
            .entry_dirs()?
            .into_iter()
            .filter_map(|(k, d)| {
                let pinned = pins.contains(&k);
                self.describe(&k, &d, now, pinned)
            })
            .collect())
    }

    pub fn evict(
        &self,
        now: SystemTime,
        max_bytes: Option<u64>,
        max_unused: Option<Duration>,
        pins: &[String],
    ) -> Result<EvictReport, CacheError> {
        let mut entries = self.list(now, pins)?;
        // Oldest use first.
        entries.sort_by_key(|e| e.last_used);
        let mut total: u64 = entries.iter().map(|e| e.disk_bytes).sum();
        let mut report = EvictReport::default();
        let now_utc = to_utc(now);
        for e in &entries {
            if e.pinned {
                continue;
            }
            let unused = (now_utc - e.last_used).to_std().unwrap_or_default();
            let too_old = max_unused.is_some_and(|m| unused > m);
            let too_big = max_bytes.is_some_and(|m| total > m);
            if !too_old && !too_big {
                continue;
            }
            // Skip entries a fetch (here or in another process) holds.
            let Some(_lock) = self.try_lock_entry(&e.key) else {
                continue;
            };
            let dir = self.entry_dir(&e.key);
            // Unpublish first, so no reader picks the body up mid-removal.
            let _ = fs::remove_file(dir.join("meta.json"));
            match fs::remove_dir_all(&dir) {
                Ok(()) => {
                    total = total.saturating_sub(e.disk_bytes);
                    report.bytes_freed += e.disk_bytes;
                    report.removed.push(e.key.clone());
                }
                Err(err) => {
                    tracing::warn!("artifact cache: cannot remove {}: {err}", dir.display())
                }
            }
        }
        report.bytes_left = total;
        Ok(report)
    }
}
