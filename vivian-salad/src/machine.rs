//! Machines: their console log, their clients and their two TCP ports.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::Waker;

use bytes::{Buf, BytesMut};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::console::Console;

/// Longest machine id accepted.
pub const MAX_MACHINE_ID_LEN: usize = 256;

/// Check that `id` can name a machine: 1 to 256 bytes, no whitespace, no
/// control character, no `/`.
pub fn validate_machine_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("it is empty".into());
    }
    if id.len() > MAX_MACHINE_ID_LEN {
        return Err(format!("it is longer than {MAX_MACHINE_ID_LEN} bytes"));
    }
    if let Some(c) = id
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || *c == '/')
    {
        return Err(format!("it contains the character {c:?}"));
    }
    Ok(())
}

/// File name of a machine's console log: the id with every byte outside
/// `[A-Za-z0-9._:@+-]` written as `%XX`, plus `.log`.
pub fn log_file_name(id: &str) -> String {
    let mut s = String::with_capacity(id.len() + 4);
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || b"._:@+-".contains(&b) {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s.push_str(".log");
    s
}

/// A machine's console log, data-path side: bytes are buffered here (under
/// the machine's state lock) and written to the file by [`LogFile::flush`],
/// off the data path. The offset of a byte is its position in the file (so
/// offsets continue across restarts of the multiplexer).
pub(crate) struct MachineLog {
    /// Total length: the file's length plus what is buffered.
    size: u64,
    /// Bytes not yet handed to the file.
    buf: Vec<u8>,
    /// Whether bytes are kept at all (a log file is open).
    enabled: bool,
    /// The buffer reached [`LOG_FLUSH_THRESHOLD`]: the flusher was told.
    flush_requested: bool,
    /// Bytes dropped because the file writer fell [`MAX_LOG_BUFFER`] behind.
    dropped: u64,
}

/// Buffered log bytes are written once this many are pending (and by the
/// periodic flusher).
const LOG_FLUSH_THRESHOLD: usize = 64 * 1024;

/// Pending log bytes beyond this (the disk does not keep up) are dropped
/// from the log, with an error, instead of growing memory without bound.
const MAX_LOG_BUFFER: usize = 64 << 20;

impl MachineLog {
    /// Append console bytes; true when the flusher should be woken now.
    fn append(&mut self, data: &[u8]) -> bool {
        self.size += data.len() as u64;
        if !self.enabled {
            return false;
        }
        if self.buf.len() + data.len() > MAX_LOG_BUFFER {
            if self.dropped == 0 {
                tracing::error!(
                    "the console log cannot be written fast enough: dropping bytes from it"
                );
            }
            self.dropped += data.len() as u64;
            return false;
        }
        self.buf.extend_from_slice(data);
        if self.buf.len() >= LOG_FLUSH_THRESHOLD && !self.flush_requested {
            self.flush_requested = true;
            return true;
        }
        false
    }
}

/// A machine's console log file. Writes are serialized by the file's lock,
/// which is held from taking the pending bytes until they are written, so
/// concurrent flushes never reorder bytes.
pub(crate) struct LogFile {
    path: Option<PathBuf>,
    /// The file opened (it is never reopened): known without the lock.
    open: bool,
    file: Mutex<Option<File>>,
    error_reported: AtomicBool,
}

impl LogFile {
    fn open(dir: Option<&Path>, id: &str) -> (Self, u64) {
        let Some(dir) = dir else {
            return (
                Self {
                    path: None,
                    open: false,
                    file: Mutex::new(None),
                    error_reported: AtomicBool::new(false),
                },
                0,
            );
        };
        let path = dir.join(log_file_name(id));
        let file = OpenOptions::new().create(true).append(true).open(&path);
        let (file, size) = match file {
            Ok(f) => {
                let size = f.metadata().map(|m| m.len()).unwrap_or(0);
                (Some(f), size)
            }
            Err(e) => {
                tracing::error!(machine = id, path = %path.display(), "cannot open the console log: {e}");
                (None, 0)
            }
        };
        (
            Self {
                path: Some(path),
                open: file.is_some(),
                file: Mutex::new(file),
                error_reported: AtomicBool::new(false),
            },
            size,
        )
    }

    fn is_open(&self) -> bool {
        self.open
    }
}

/// Read `max_len` bytes of a log file from `offset`.
pub(crate) fn read_log_file(path: &Path, offset: u64, max_len: usize) -> io::Result<Vec<u8>> {
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    if offset >= len {
        return Ok(Vec::new());
    }
    f.seek(SeekFrom::Start(offset))?;
    let want = ((len - offset) as usize).min(max_len);
    let mut data = Vec::with_capacity(want);
    f.take(want as u64).read_to_end(&mut data)?;
    Ok(data)
}

/// Shared state of one client (TCP or in-process) of a machine.
pub(crate) struct Client {
    pub(crate) id: u64,
    pub(crate) rw: bool,
    pub(crate) peer: Option<SocketAddr>,
    pub(crate) start_offset: u64,
    pub(crate) tcp: Option<Arc<TcpStream>>,
    pub(crate) state: Mutex<ClientState>,
    pub(crate) notify: Notify,
}

#[derive(Default)]
pub(crate) struct ClientState {
    pub(crate) pending: BytesMut,
    pub(crate) closed: bool,
    pub(crate) overflowed: bool,
    pub(crate) waker: Option<Waker>,
}

impl Client {
    pub(crate) fn new(
        id: u64,
        rw: bool,
        peer: Option<SocketAddr>,
        start_offset: u64,
        tcp: Option<Arc<TcpStream>>,
    ) -> Self {
        Self {
            id,
            rw,
            peer,
            start_offset,
            tcp,
            state: Mutex::new(ClientState::default()),
            notify: Notify::new(),
        }
    }

    /// Queue `data` for the client; false when the client is gone (closed,
    /// broken or too far behind) and must be dropped.
    fn push(&self, data: &[u8], max_backlog: usize) -> bool {
        let mut st = self.state.lock().unwrap();
        if st.closed {
            return false;
        }
        let mut rest = data;
        if st.pending.is_empty() {
            if let Some(tcp) = &self.tcp {
                // Fast path: write straight to the socket.
                match tcp.try_write(data) {
                    Ok(n) => rest = &data[n..],
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => {
                        tracing::debug!(peer = ?self.peer, "console client write failed: {e}");
                        st.closed = true;
                        drop(st);
                        self.wake();
                        return false;
                    }
                }
                if rest.is_empty() {
                    return true;
                }
            }
        }
        if st.pending.len() + rest.len() > max_backlog {
            tracing::warn!(
                peer = ?self.peer,
                "console client is more than {max_backlog} bytes behind: disconnecting it"
            );
            st.closed = true;
            st.overflowed = true;
            drop(st);
            self.wake();
            return false;
        }
        st.pending.extend_from_slice(rest);
        let waker = st.waker.take();
        drop(st);
        if let Some(w) = waker {
            w.wake();
        }
        self.notify.notify_one();
        true
    }

    /// Mark closed and wake whoever serves the client.
    pub(crate) fn close(&self) {
        self.state.lock().unwrap().closed = true;
        self.wake();
    }

    fn wake(&self) {
        let waker = self.state.lock().unwrap().waker.take();
        if let Some(w) = waker {
            w.wake();
        }
        self.notify.notify_one();
    }

    /// Write pending bytes to the TCP socket; Err when the socket broke.
    pub(crate) fn flush_tcp(&self) -> io::Result<()> {
        let Some(tcp) = &self.tcp else { return Ok(()) };
        let mut st = self.state.lock().unwrap();
        while !st.pending.is_empty() {
            match tcp.try_write(&st.pending) {
                Ok(n) => st.pending.advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Description of one client, for `GET /api/v1/machine/<id>/clients`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClientInfo {
    /// The client's address as seen by the multiplexer (`None` for
    /// in-process clients).
    pub peer: Option<SocketAddr>,
    /// Read-write (true) or read-only (false).
    pub rw: bool,
    /// Log offset of the first console byte this client was sent.
    pub start_offset: u64,
}

pub(crate) struct MachineState {
    pub(crate) log: MachineLog,
    pub(crate) clients: Vec<Arc<Client>>,
    pub(crate) console: Option<Weak<Console>>,
}

/// One machine known to the multiplexer.
pub(crate) struct Machine {
    pub(crate) id: String,
    pub(crate) rw_port: u16,
    pub(crate) ro_port: u16,
    pub(crate) max_client_backlog: usize,
    pub(crate) state: Mutex<MachineState>,
    log_file: LogFile,
    /// Wakes the multiplexer's log flusher early (a log buffer is full).
    flush_notify: Arc<Notify>,
    next_client: AtomicU64,
}

impl Machine {
    pub(crate) fn new(
        id: String,
        rw_port: u16,
        ro_port: u16,
        log_dir: Option<&Path>,
        max_client_backlog: usize,
        flush_notify: Arc<Notify>,
    ) -> Self {
        let (log_file, size) = LogFile::open(log_dir, &id);
        let log = MachineLog {
            size,
            buf: Vec::new(),
            enabled: log_file.is_open(),
            flush_requested: false,
            dropped: 0,
        };
        Self {
            id,
            rw_port,
            ro_port,
            max_client_backlog,
            state: Mutex::new(MachineState {
                log,
                clients: Vec::new(),
                console: None,
            }),
            log_file,
            flush_notify,
            next_client: AtomicU64::new(1),
        }
    }

    /// Console output: append to the log buffer and copy to every client.
    /// Never touches the disk.
    pub(crate) fn publish(&self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let mut st = self.state.lock().unwrap();
        let wake_flusher = st.log.append(data);
        let max = self.max_client_backlog;
        st.clients.retain(|c| c.push(data, max));
        drop(st);
        if wake_flusher {
            self.flush_notify.notify_one();
        }
    }

    /// Register a client. A second read-write client is refused with the
    /// reference's message.
    pub(crate) fn add_client(
        &self,
        rw: bool,
        peer: Option<SocketAddr>,
        tcp: Option<Arc<TcpStream>>,
    ) -> Result<Arc<Client>, &'static str> {
        let mut st = self.state.lock().unwrap();
        st.clients.retain(|c| !c.state.lock().unwrap().closed);
        if rw && st.clients.iter().any(|c| c.rw) {
            return Err(crate::BUSY_MESSAGE);
        }
        let id = self.next_client.fetch_add(1, Ordering::Relaxed);
        let client = Arc::new(Client::new(id, rw, peer, st.log.size, tcp));
        st.clients.push(client.clone());
        Ok(client)
    }

    pub(crate) fn remove_client(&self, client_id: u64) {
        let mut st = self.state.lock().unwrap();
        st.clients.retain(|c| {
            if c.id == client_id {
                c.close();
                false
            } else {
                true
            }
        });
    }

    pub(crate) fn has_rw_client(&self) -> bool {
        let st = self.state.lock().unwrap();
        st.clients
            .iter()
            .any(|c| c.rw && !c.state.lock().unwrap().closed)
    }

    pub(crate) fn clients(&self) -> (u64, Vec<ClientInfo>) {
        let st = self.state.lock().unwrap();
        let list = st
            .clients
            .iter()
            .filter(|c| !c.state.lock().unwrap().closed)
            .map(|c| ClientInfo {
                peer: c.peer,
                rw: c.rw,
                start_offset: c.start_offset,
            })
            .collect();
        (st.log.size, list)
    }

    /// Write the buffered log bytes to the file. Blocking: call it off the
    /// runtime's workers. Returns the log size it wrote up to: every byte
    /// before that offset is in the file (unless the file is unavailable).
    pub(crate) fn flush_log(&self) -> u64 {
        // Held until the bytes are written: flushes stay in order.
        let mut file = self.log_file.file.lock().unwrap();
        let (mut data, size) = {
            let mut st = self.state.lock().unwrap();
            st.log.flush_requested = false;
            (std::mem::take(&mut st.log.buf), st.log.size)
        };
        if data.is_empty() {
            return size;
        }
        if let Some(f) = file.as_mut() {
            match f.write_all(&data) {
                Ok(()) => self.log_file.error_reported.store(false, Ordering::Relaxed),
                Err(e) => {
                    if !self.log_file.error_reported.swap(true, Ordering::Relaxed) {
                        tracing::error!(
                            machine = %self.id,
                            path = %self.log_file.path.as_deref().unwrap_or(Path::new("")).display(),
                            "cannot append to the console log, bytes are lost: {e}"
                        );
                    }
                }
            }
        }
        drop(file);
        // Hand the allocation back for the next bytes (unless it grew
        // large during a stall, or new bytes already have a buffer).
        data.clear();
        if data.capacity() <= 2 * LOG_FLUSH_THRESHOLD {
            let mut st = self.state.lock().unwrap();
            if st.log.buf.capacity() == 0 {
                st.log.buf = data;
            }
        }
        size
    }

    /// The log file's path, if logs are enabled and the file is open.
    pub(crate) fn log_path(&self) -> Option<PathBuf> {
        if self.log_file.is_open() {
            self.log_file.path.clone()
        } else {
            None
        }
    }

    /// Close every client (the log is flushed by the caller, off the
    /// runtime).
    pub(crate) fn close_all_clients(&self) {
        let mut st = self.state.lock().unwrap();
        for c in st.clients.drain(..) {
            c.close();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_ids_are_checked() {
        assert!(validate_machine_id("52:54:00:12:34:56").is_ok());
        assert!(validate_machine_id("machine1").is_ok());
        assert!(validate_machine_id("").is_err());
        assert!(validate_machine_id("a b").is_err());
        assert!(validate_machine_id("a/b").is_err());
        assert!(validate_machine_id("a\u{0}").is_err());
        assert!(validate_machine_id(&"x".repeat(300)).is_err());
    }

    #[test]
    fn log_names_cannot_escape_the_directory() {
        assert_eq!(log_file_name("52:54:00:12:34:56"), "52:54:00:12:34:56.log");
        assert_eq!(log_file_name(".."), "...log");
        assert_eq!(log_file_name("a%b\\c"), "a%25b%5Cc.log");
    }

    #[test]
    fn log_offsets_continue_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let notify = Arc::new(Notify::new());
        let m = Machine::new("m1".into(), 1, 2, Some(dir.path()), 1 << 20, notify.clone());
        m.publish(b"hello ");
        assert_eq!(m.flush_log(), 6);
        drop(m);
        let m = Machine::new("m1".into(), 1, 2, Some(dir.path()), 1 << 20, notify);
        assert_eq!(m.clients().0, 6);
        m.publish(b"world");
        // Nothing reaches the file before a flush.
        let p = dir.path().join("m1.log");
        assert_eq!(read_log_file(&p, 0, 100).unwrap(), b"hello ");
        assert_eq!(m.flush_log(), 11);
        assert_eq!(read_log_file(&p, 0, 100).unwrap(), b"hello world");
        assert_eq!(read_log_file(&p, 6, 3).unwrap(), b"wor");
        assert_eq!(read_log_file(&p, 99, 3).unwrap(), b"");
    }

    #[tokio::test]
    async fn a_full_log_buffer_wakes_the_flusher_and_flushes_keep_order() {
        let dir = tempfile::tempdir().unwrap();
        let notify = Arc::new(Notify::new());
        let m = Arc::new(Machine::new(
            "m2".into(),
            1,
            2,
            Some(dir.path()),
            1 << 20,
            notify.clone(),
        ));
        // Small appends do not wake the flusher (it runs periodically).
        m.publish(b"small");
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(20), notify.notified())
                .await
                .is_err()
        );
        // Crossing the threshold does, once.
        let big: Vec<u8> = (0..LOG_FLUSH_THRESHOLD).map(|i| (i % 251) as u8).collect();
        m.publish(&big);
        tokio::time::timeout(std::time::Duration::from_secs(1), notify.notified())
            .await
            .expect("the flusher is woken when a log buffer is full");
        // Concurrent flushes while bytes keep coming: the file holds the
        // stream in order.
        let mut expected = b"small".to_vec();
        expected.extend_from_slice(&big);
        let flushers: Vec<_> = (0..4)
            .map(|_| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        m.flush_log();
                    }
                })
            })
            .collect();
        for i in 0..2000u32 {
            let chunk = i.to_le_bytes();
            m.publish(&chunk);
            expected.extend_from_slice(&chunk);
        }
        for f in flushers {
            f.join().unwrap();
        }
        assert_eq!(m.flush_log(), expected.len() as u64);
        let p = dir.path().join("m2.log");
        assert_eq!(read_log_file(&p, 0, usize::MAX).unwrap(), expected);
    }

    #[test]
    fn without_a_log_directory_offsets_still_count() {
        let m = Machine::new("m3".into(), 1, 2, None, 1 << 20, Arc::new(Notify::new()));
        m.publish(b"abc");
        assert_eq!(m.flush_log(), 3);
        assert!(m.log_path().is_none());
    }
}
