//! The YAML file backend of [`MarsDb`], with live reload.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use notify::{RecursiveMode, Watcher};
use tokio::sync::{watch, Mutex, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::yaml::{self, ParseOptions};
use super::{Change, Database, MarsDb, MarsDbError, ValidationError, Validator};

/// Options of [`FileMarsDb`].
#[derive(Clone)]
pub struct FileOptions {
    /// `EXECUTOR_VPDU_ENDPOINT` (`host:port`): when set, every load adds or
    /// overwrites the PDU `VPDU` (driver `vpdu`, `config.hostname` = this).
    pub vpdu_endpoint: Option<String>,
    /// Extra validation run on every load and change (e.g. known PDU
    /// drivers). An error makes a file edit invalid, or a change refused.
    pub validator: Option<Validator>,
    /// Quiet time after the last file event before the file is re-read
    /// (editors write in several steps). Default 30 ms.
    pub debounce: Duration,
    /// Longest delay between the first event and the re-read, even when
    /// events keep coming. Default 300 ms.
    pub max_delay: Duration,
    /// Re-read the file this often even without events (a safety net; the
    /// re-read is a no-op when the bytes did not change). Default 30 s;
    /// `None` disables it.
    pub rescan_interval: Option<Duration>,
}

impl Default for FileOptions {
    fn default() -> Self {
        FileOptions {
            vpdu_endpoint: None,
            validator: None,
            debounce: Duration::from_millis(30),
            max_delay: Duration::from_millis(300),
            rescan_interval: Some(Duration::from_secs(30)),
        }
    }
}

impl std::fmt::Debug for FileOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileOptions")
            .field("vpdu_endpoint", &self.vpdu_endpoint)
            .field("validator", &self.validator.as_ref().map(|_| "<fn>"))
            .field("debounce", &self.debounce)
            .field("max_delay", &self.max_delay)
            .field("rescan_interval", &self.rescan_interval)
            .finish()
    }
}

/// [`MarsDb`] stored in a YAML file (`MARS_DB_FILE`), live-editable.
///
/// * [`FileMarsDb::open`] creates the file (an empty database) if it is
///   missing; an empty file is an empty database.
/// * The file's folder is watched (so saves by rename, as vim and
///   `sed -i` do, are seen); after a short quiet time the file is re-read.
///   Identical bytes are ignored, so the backend's own writes cause no
///   reload and no change notification.
/// * An invalid edit keeps the last good database in force, is logged
///   (with file, line and column) and exposed by [`MarsDb::error`]; writes
///   then fail with [`MarsDbError::InvalidFile`] and leave the file as the
///   admin wrote it. A removed file is treated the same way. Fixing the
///   file clears the error.
/// * Writes are serialised, and committed in groups: changes that arrive
///   while a write is in progress are applied in memory one after the
///   other (each validated on top of the previous ones) and written
///   together by the next write; each caller gets its answer once the
///   write that holds its change is done (or has failed: then none of the
///   group's changes is kept).
/// * Before a write the file is re-read, so an edit
///   whose event is still pending is applied (or, if invalid, blocks the
///   write) rather than overwritten. Writes go to a temporary file in the
///   same folder, which is fsynced and renamed over the file, then the
///   folder is fsynced. Nothing is written when a change changes nothing.
///   An edit of the file that lands while a group is being saved wins: the
///   group is refused with [`MarsDbError::InvalidFile`] (saying so) and the
///   edit is loaded.
/// * A DUT entry without `first_seen` gets the current time, and keeps it
///   across reloads while the process runs; it is written to the file with
///   the next write.
///
/// Dropping the backend stops the watcher.
pub struct FileMarsDb {
    inner: Arc<Inner>,
    _watcher: notify::RecommendedWatcher,
    task: JoinHandle<()>,
}

/// Result of one change, sent to its caller once the batch is written.
type Outcome = Result<Arc<Database>, MarsDbError>;

struct State {
    /// The bytes of the file as last read or written by us.
    disk: Option<Vec<u8>>,
    /// Changes applied in memory but not yet written (group commit): the
    /// database they produce, not yet published.
    pending: Option<Arc<Database>>,
    /// The callers waiting for `pending` to be written.
    batch: Vec<tokio::sync::oneshot::Sender<Outcome>>,
}

struct Inner {
    path: PathBuf,
    opts: FileOptions,
    /// The write lock and what it protects.
    state: Mutex<State>,
    db: watch::Sender<Arc<Database>>,
    error: watch::Sender<Option<ValidationError>>,
    wake: Notify,
    /// How many times the file was read.
    reads: AtomicU64,
}

impl Drop for FileMarsDb {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FileMarsDb {
    /// Opens (creating if missing) the database file at `path` and starts
    /// watching it. Must be called within a tokio runtime.
    ///
    /// An invalid file does not make `open` fail: the backend starts with an
    /// empty database (plus the VPDU, if configured) and the error is
    /// reported by [`MarsDb::error`], as for a later invalid edit; a caller
    /// that prefers to stop can check `error()` right after `open`. Fails on
    /// I/O errors (unreadable file, missing folder, no watcher).
    pub async fn open(path: impl AsRef<Path>, opts: FileOptions) -> Result<Self, MarsDbError> {
        let path = std::path::absolute(path.as_ref()).map_err(|e| io_err(path.as_ref(), e))?;
        let dir = path.parent().map(Path::to_path_buf).ok_or_else(|| {
            io_err(
                &path,
                std::io::Error::other("the path has no parent folder"),
            )
        })?;
        let file_name = path
            .file_name()
            .map(|n| n.to_os_string())
            .ok_or_else(|| io_err(&path, std::io::Error::other("the path has no file name")))?;

        let mut initial = Database::new();
        if let Some(ep) = &opts.vpdu_endpoint {
            initial.apply_vpdu_endpoint(ep);
        }
        if !tokio::fs::try_exists(&path)
            .await
            .map_err(|e| io_err(&path, e))?
        {
            let text = Database::new().to_yaml();
            let p = path.clone();
            tokio::task::spawn_blocking(move || write_atomic(&p, text.as_bytes()))
                .await
                .map_err(|e| io_err(&path, std::io::Error::other(e)))?
                .map_err(|e| io_err(&path, e))?;
            tracing::info!(file = %path.display(), "created an empty MarsDB file");
        }

        let inner = Arc::new(Inner {
            path: path.clone(),
            opts,
            state: Mutex::new(State {
                disk: None,
                pending: None,
                batch: Vec::new(),
            }),
            db: watch::Sender::new(Arc::new(initial)),
            error: watch::Sender::new(None),
            wake: Notify::new(),
            reads: AtomicU64::new(0),
        });

        // Watch before the first read, so no edit falls in between.
        let weak = Arc::downgrade(&inner);
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            let relevant = match &res {
                Ok(ev) => {
                    may_change_content(&ev.kind)
                        && ev
                            .paths
                            .iter()
                            .any(|p| p.file_name() == Some(file_name.as_os_str()))
                }
                Err(_) => true,
            };
            if relevant {
                if let Some(inner) = weak.upgrade() {
                    inner.wake.notify_one();
                }
            }
        })
        .map_err(|e| io_err(&dir, std::io::Error::other(e)))?;
        watcher
            .watch(&dir, RecursiveMode::NonRecursive)
            .map_err(|e| io_err(&dir, std::io::Error::other(e)))?;

        {
            let mut st = inner.state.lock().await;
            inner.sync_from_disk(&mut st.disk).await?;
        }

        let task = tokio::spawn(reload_loop(inner.clone()));
        Ok(FileMarsDb {
            inner,
            _watcher: watcher,
            task,
        })
    }

    /// The path of the database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// How many times the file was read since [`FileMarsDb::open`]: after
    /// the first read, once per batch of file events (and per rescan or
    /// write). A diagnostic: an idle farm reads its file only on rescans.
    pub fn disk_reads(&self) -> u64 {
        self.inner.reads.load(Ordering::Relaxed)
    }

    /// Re-reads the file now (what a file event does, without waiting).
    pub async fn reload(&self) -> Result<(), MarsDbError> {
        let mut st = self.inner.state.lock().await;
        self.inner.sync_or_flush(&mut st).await
    }
}

async fn reload_loop(inner: Arc<Inner>) {
    loop {
        match inner.opts.rescan_interval {
            Some(every) => {
                tokio::select! {
                    _ = inner.wake.notified() => {}
                    _ = tokio::time::sleep(every) => {}
                }
            }
            None => inner.wake.notified().await,
        }
        // Wait for a quiet period (bounded by max_delay).
        let deadline = Instant::now() + inner.opts.max_delay;
        loop {
            let quiet = tokio::time::sleep(inner.opts.debounce);
            tokio::select! {
                _ = inner.wake.notified() => {
                    if Instant::now() >= deadline {
                        break;
                    }
                }
                _ = quiet => break,
            }
        }
        let mut st = inner.state.lock().await;
        if let Err(e) = inner.sync_or_flush(&mut st).await {
            tracing::error!(error = %e, "cannot read the MarsDB file");
        }
    }
}

/// Whether a file event can mean new content. Opening, reading and
/// closing a file without writing (our own re-read, a backup, `cat`) cannot:
/// reacting to those would make every re-read trigger the next one.
fn may_change_content(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

fn io_err(path: &Path, source: std::io::Error) -> MarsDbError {
    MarsDbError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Inner {
    fn set_error(&self, error: Option<ValidationError>) {
        self.error.send_if_modified(|cur| {
            if *cur == error {
                false
            } else {
                *cur = error;
                true
            }
        });
    }

    /// With the lock held: writes the pending batch if there is one, else
    /// re-reads the file.
    async fn sync_or_flush(&self, st: &mut State) -> Result<(), MarsDbError> {
        if st.batch.is_empty() {
            self.sync_from_disk(&mut st.disk).await
        } else {
            self.flush(st).await;
            Ok(())
        }
    }

    /// With the lock held: writes the pending database atomically,
    /// publishes it and answers every caller of the batch. If the file was
    /// edited since we last read it, the edit wins: the batch is refused
    /// with [`MarsDbError::InvalidFile`] and the edit is loaded.
    async fn flush(&self, st: &mut State) {
        let batch = std::mem::take(&mut st.batch);
        let Some(pending) = st.pending.take() else {
            for tx in batch {
                let _ = tx.send(Ok(self.db.borrow().clone()));
            }
            return;
        };
        let on_disk = match tokio::fs::read(&self.path).await {
            Ok(b) => Some(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                let msg = e.to_string();
                for tx in batch {
                    let _ = tx.send(Err(io_err(
                        &self.path,
                        std::io::Error::new(e.kind(), msg.clone()),
                    )));
                }
                return;
            }
        };
        if on_disk != st.disk {
            tracing::warn!(
                file = %self.path.display(),
                "the MarsDB file was edited while {} change(s) were being saved; keeping the edit, refusing the changes",
                batch.len()
            );
            let err = ValidationError::new(
                "",
                "the file was edited while this change was being saved; the edit was kept, retry the change",
            )
            .with_file(&self.path);
            for tx in batch {
                let _ = tx.send(Err(MarsDbError::InvalidFile(err.clone())));
            }
            if let Err(e) = self.sync_from_disk(&mut st.disk).await {
                tracing::error!(error = %e, "cannot read the MarsDB file");
            }
            return;
        }
        let bytes = pending.to_yaml().into_bytes();
        let path = self.path.clone();
        let data = bytes.clone();
        let written = match tokio::task::spawn_blocking(move || write_atomic(&path, &data)).await {
            Ok(r) => r,
            Err(e) => Err(std::io::Error::other(e)),
        };
        match written {
            Ok(()) => {
                st.disk = Some(bytes);
                self.db.send_replace(pending.clone());
                for tx in batch {
                    let _ = tx.send(Ok(pending.clone()));
                }
            }
            Err(e) => {
                tracing::error!(file = %self.path.display(), error = %e, "cannot write the MarsDB file; {} change(s) dropped", batch.len());
                let msg = e.to_string();
                for tx in batch {
                    let _ = tx.send(Err(io_err(
                        &self.path,
                        std::io::Error::new(e.kind(), msg.clone()),
                    )));
                }
            }
        }
    }

    /// Brings memory in line with the file: no-op when its bytes are the
    /// ones we last saw; else parses them and either publishes the new
    /// database or records the error. Called with the write lock held.
    async fn sync_from_disk(&self, disk: &mut Option<Vec<u8>>) -> Result<(), MarsDbError> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        let bytes = match tokio::fs::read(&self.path).await {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if disk.is_some() || self.error.borrow().is_none() {
                    let err = ValidationError::new(
                        "",
                        "the file was removed; the last good database stays in force until it is back",
                    )
                    .with_file(&self.path);
                    tracing::error!("MarsDB: {err}");
                    self.set_error(Some(err));
                }
                *disk = None;
                return Ok(());
            }
            Err(e) => return Err(io_err(&self.path, e)),
        };
        if disk.as_deref() == Some(bytes.as_slice()) {
            return Ok(());
        }
        let result = match std::str::from_utf8(&bytes) {
            Ok(text) => {
                let current = self.db.borrow().clone();
                yaml::parse(
                    text,
                    Some(&current),
                    &ParseOptions {
                        file: Some(&self.path),
                        vpdu_endpoint: self.opts.vpdu_endpoint.as_deref(),
                        validator: self.opts.validator.as_ref(),
                    },
                )
            }
            Err(e) => Err(
                ValidationError::new("", format!("the file is not UTF-8 text: {e}"))
                    .with_file(&self.path),
            ),
        };
        *disk = Some(bytes);
        match result {
            Ok(db) => {
                let changed = self.db.send_if_modified(|cur| {
                    if **cur == db {
                        false
                    } else {
                        *cur = Arc::new(db);
                        true
                    }
                });
                if self.error.borrow().is_some() {
                    tracing::info!(file = %self.path.display(), "MarsDB file fixed; its content is now in force");
                } else if changed {
                    tracing::info!(file = %self.path.display(), "MarsDB file changed; reloaded");
                }
                self.set_error(None);
            }
            Err(e) => {
                tracing::error!(
                    "invalid MarsDB edit, keeping the last good database and refusing API writes until it is fixed: {e}"
                );
                self.set_error(Some(e));
            }
        }
        Ok(())
    }
}

#[async_trait]
impl MarsDb for FileMarsDb {
    fn snapshot(&self) -> Arc<Database> {
        self.inner.db.borrow().clone()
    }

    fn subscribe(&self) -> watch::Receiver<Arc<Database>> {
        self.inner.db.subscribe()
    }

    fn error(&self) -> Option<ValidationError> {
        self.inner.error.borrow().clone()
    }

    fn subscribe_error(&self) -> watch::Receiver<Option<ValidationError>> {
        self.inner.error.subscribe()
    }

    async fn apply<'a>(&'a self, change: Change<'a>) -> Result<Arc<Database>, MarsDbError> {
        let inner = &self.inner;
        // Phase 1, under the lock: apply the change in memory on top of the
        // pending (not yet written) state, and join the batch to write.
        let mut rx = {
            let mut st = inner.state.lock().await;
            if st.batch.is_empty() {
                // An edit whose file event is still pending must not be
                // overwritten: read the file first.
                inner.sync_from_disk(&mut st.disk).await?;
            }
            if let Some(e) = self.error() {
                return Err(MarsDbError::InvalidFile(e));
            }
            let base = st.pending.clone().unwrap_or_else(|| self.snapshot());
            let mut next = (*base).clone();
            change(&mut next).map_err(MarsDbError::Rejected)?;
            if next == *base && st.batch.is_empty() {
                return Ok(base);
            }
            next.validate().map_err(MarsDbError::Invalid)?;
            if let Some(v) = &inner.opts.validator {
                v(&next).map_err(MarsDbError::Invalid)?;
            }
            st.pending = Some(Arc::new(next));
            let (tx, rx) = tokio::sync::oneshot::channel();
            st.batch.push(tx);
            rx
        };
        // Phase 2: write the batch, unless a caller queued before us already
        // wrote it (together with our change). Changes queued while a
        // write is in progress are written together by the next writer.
        if let Ok(outcome) = rx.try_recv() {
            return outcome;
        }
        {
            let mut st = inner.state.lock().await;
            if !st.batch.is_empty() {
                inner.flush(&mut st).await;
            }
        }
        match rx.await {
            Ok(outcome) => outcome,
            Err(_) => Err(io_err(
                &inner.path,
                std::io::Error::other("the MarsDB write was abandoned"),
            )),
        }
    }
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes `data` to `path` atomically: a temporary file in the same folder
/// (the target's, when `path` is a symlink), fsync, rename, fsync of the
/// folder. The file keeps its permissions.
fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let target = match std::fs::canonicalize(path) {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => path.to_path_buf(),
        Err(e) => return Err(e),
    };
    let dir = target
        .parent()
        .ok_or_else(|| std::io::Error::other("the path has no parent folder"))?;
    let name = target
        .file_name()
        .ok_or_else(|| std::io::Error::other("the path has no file name"))?
        .to_string_lossy();
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        if let Ok(meta) = std::fs::metadata(&target) {
            f.set_permissions(meta.permissions())?;
        }
        f.write_all(data)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, &target)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    std::fs::File::open(dir)?.sync_all()
}
