//! Hot-plug notifications for the serial scan: an inotify watch on the
//! directory each serial glob lists.
//!
//! Scanning the globs costs a `stat` per matching symbolic link (the `glob`
//! crate resolves each one) and another per port (its device number): at
//! 500 ports scanned every 500 ms that was several percent of the
//! multiplexer's CPU while nothing changed. With these watches the serial
//! loop scans when a watched directory gains or loses an entry, and
//! otherwise only every [`FULL_SCAN_PERIOD`] (what a watch cannot see:
//! wildcards below the first level, a directory the kernel cannot watch).
//!
//! The watch mask holds only entry creation, deletion and renames: with
//! read, write or attribute events in it, the kernel would check the
//! watching parent on every `read` of a port in that directory.

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};
use tokio::io::unix::AsyncFd;

/// With watches in place, the globs are still scanned this often.
pub(crate) const FULL_SCAN_PERIOD: Duration = Duration::from_secs(10);

/// Directory entries appearing, disappearing or renamed; the directory
/// itself going away.
fn mask() -> WatchMask {
    WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::MOVED_FROM
        | WatchMask::MOVED_TO
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF
        | WatchMask::ONLYDIR
}

/// The directory whose entries can change what `glob` matches at its first
/// wildcard: the glob's leading literal directory, or that directory's
/// nearest existing ancestor while it does not exist (its creation then
/// shows up as an entry of the ancestor). `None` for an empty glob.
pub(crate) fn watch_dir(glob: &str) -> Option<PathBuf> {
    let path = Path::new(glob);
    let mut literal = PathBuf::new();
    let mut wildcard = false;
    for c in path.components() {
        if let Component::Normal(s) = c {
            if s.as_encoded_bytes()
                .iter()
                .any(|b| matches!(b, b'*' | b'?' | b'['))
            {
                wildcard = true;
                break;
            }
        }
        literal.push(c);
    }
    if glob.is_empty() {
        return None;
    }
    // A glob without a wildcard names one path: watch its directory.
    let mut dir = if wildcard {
        literal
    } else {
        literal.parent().map(Path::to_path_buf).unwrap_or_default()
    };
    // Relative to the working directory.
    if dir.as_os_str().is_empty() {
        dir = PathBuf::from(".");
    }
    loop {
        if dir.is_dir() {
            return Some(dir);
        }
        dir = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            // The top of a relative path: the working directory, once.
            Some(_) if dir != Path::new(".") => PathBuf::from("."),
            _ => return None,
        };
    }
}

/// Inotify watches on the directories of the serial globs.
pub(crate) struct DirWatch {
    fd: AsyncFd<Inotify>,
    watched: HashMap<PathBuf, WatchDescriptor>,
    /// Directories a watch was refused for, already logged.
    refused: HashSet<PathBuf>,
    buf: Vec<u8>,
}

/// Wait until a watched directory changes ([`DirWatch::changed`]); never,
/// without a watch.
pub(crate) async fn changed(watch: Option<&mut DirWatch>) -> io::Result<()> {
    match watch {
        Some(w) => w.changed().await,
        None => std::future::pending().await,
    }
}

impl DirWatch {
    /// An inotify instance without watches. Must run inside a tokio runtime.
    pub(crate) fn new() -> io::Result<Self> {
        let inotify = Inotify::init()?;
        // SAFETY: the AsyncFd owns the Inotify, whose descriptor stays open
        // and the same until the AsyncFd is dropped.
        let fd = unsafe { AsyncFd::register(inotify) }.map_err(|e| e.into_parts().1)?;
        Ok(Self {
            fd,
            watched: HashMap::new(),
            refused: HashSet::new(),
            buf: vec![0; 4096],
        })
    }

    /// Watch the directories of `globs` (see [`watch_dir`]) and drop the
    /// watches no glob needs any more. True when a watch was added: what
    /// that directory gained before it was watched can only be found by
    /// scanning again. A directory that cannot be watched is logged and
    /// left to the periodic scan.
    pub(crate) fn update(&mut self, globs: &[String]) -> bool {
        let wanted: Vec<PathBuf> = globs.iter().filter_map(|g| watch_dir(g)).collect();
        let stale: Vec<PathBuf> = self
            .watched
            .keys()
            .filter(|d| !wanted.contains(d))
            .cloned()
            .collect();
        for d in stale {
            if let Some(wd) = self.watched.remove(&d) {
                // Already gone if the directory was removed: nothing to undo.
                let _ = self.fd.get_mut().watches().remove(wd);
            }
        }
        let mut added = false;
        for d in wanted {
            if self.watched.contains_key(&d) {
                continue;
            }
            match self.fd.get_mut().watches().add(&d, mask()) {
                Ok(wd) => {
                    tracing::debug!(dir = %d.display(), "watching for serial ports");
                    self.refused.remove(&d);
                    self.watched.insert(d, wd);
                    added = true;
                }
                // Tried again at every scan, logged once.
                Err(e) => {
                    if self.refused.insert(d.clone()) {
                        tracing::warn!(
                            dir = %d.display(),
                            "cannot watch for serial ports being plugged in ({e}): scanning every {}s",
                            FULL_SCAN_PERIOD.as_secs()
                        );
                    }
                }
            }
        }
        added
    }

    /// Wait until a watched directory changes, then consume every pending
    /// event. Cancel-safe. A watch whose directory went away is forgotten
    /// (the next [`DirWatch::update`] watches its ancestor instead).
    pub(crate) async fn changed(&mut self) -> io::Result<()> {
        loop {
            let mut guard = self.fd.readable_mut().await?;
            let mut any = false;
            loop {
                let (inotify, buf) = (guard.get_inner_mut(), &mut self.buf);
                match inotify.read_events(buf) {
                    Ok(events) => {
                        for ev in events {
                            any = true;
                            if ev.mask.contains(EventMask::IGNORED) {
                                self.watched.retain(|_, wd| *wd != ev.wd);
                            }
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        guard.clear_ready();
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
            if any {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watched_directory_is_the_literal_part_or_its_nearest_ancestor() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let g = |s: &str| d.join(s).display().to_string();
        assert_eq!(watch_dir(&g("ttyUSB*")), Some(d.to_path_buf()));
        assert_eq!(watch_dir(&g("tty[AU]*")), Some(d.to_path_buf()));
        // Not there yet: its nearest existing ancestor.
        assert_eq!(watch_dir(&g("serial/by-id/*")), Some(d.to_path_buf()));
        std::fs::create_dir_all(d.join("serial/by-id")).unwrap();
        assert_eq!(
            watch_dir(&g("serial/by-id/*")),
            Some(d.join("serial/by-id"))
        );
        // Deeper wildcards: the directory above the first one.
        assert_eq!(watch_dir(&g("serial/*/port?")), Some(d.join("serial")));
        // No wildcard: the directory of that one path.
        assert_eq!(watch_dir(&g("serial/ttyS0")), Some(d.join("serial")));
        assert_eq!(watch_dir(""), None);
        // Relative globs: the working directory.
        assert_eq!(watch_dir("ttyUSB*"), Some(PathBuf::from(".")));
        assert_eq!(watch_dir("ttyS0"), Some(PathBuf::from(".")));
        assert_eq!(watch_dir("no-such-dir/tty*"), Some(PathBuf::from(".")));
    }
}
