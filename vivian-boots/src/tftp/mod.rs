//! The read-only TFTP server (IN B.8).
//!
//! RFC 1350 in octet mode with the option extensions of RFC 2347 (OACK),
//! RFC 2348 (`blksize`), RFC 2349 (`tsize`, `timeout`) and RFC 7440
//! (`windowsize`). The main socket only receives requests; each transfer
//! runs on its own thread with its own UDP socket (a new port, the "TID"),
//! connected to the client. Blocking I/O on a dedicated thread keeps the
//! ACK-to-DATA latency low, which is what bounds lock-step TFTP throughput.
//!
//! Files are served from the root only: a name with a `..` component, or
//! whose resolved path (symlinks followed) leaves the root, a missing file
//! and anything that is not a regular file are refused with ERROR 1.
//! Write requests are refused with ERROR 4. The one exception is the names
//! a [`DynamicFiles`] provider claims (U-Boot's generated boot script and
//! the artifacts it fetches, see [`crate::uboot`]): they are produced on
//! request, on a task of their own so that a slow download never holds up
//! other requests.

pub mod packet;

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, IoSlice};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket as StdUdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use nix::errno::Errno;
use nix::sys::socket::{sendmmsg, MsgFlags, MultiHeaders};
use tokio::net::UdpSocket;
use tracing::{debug, info, warn};
use vivian_core::netboot::{BootEvent, BootEventKind, BootEventSink, KnownDut};

use crate::iface::bind_udp;
use packet::{error_code, ClientPacket, Request};

/// Largest block size accepted (RFC 2348).
pub const MAX_BLKSIZE: usize = 65464;
/// Largest window accepted (RFC 7440 allows 65535; more buys nothing).
pub const MAX_WINDOWSIZE: u64 = 256;

/// Settings of the TFTP server.
#[derive(Debug, Clone)]
pub struct TftpConfig {
    /// The directory served.
    pub root: PathBuf,
    /// Time to wait for an ACK before retransmitting (overridden by the
    /// client's `timeout` option).
    pub timeout: Duration,
    /// Retransmissions of one block (or window) before giving up.
    pub retries: u32,
    /// Most concurrent transfers; requests beyond are refused.
    pub max_transfers: usize,
    /// Interface transfer sockets are bound to (SO_BINDTODEVICE), if any.
    pub device: Option<String>,
}

impl TftpConfig {
    /// The reference's settings: 1 s timeout, 10 retries.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        TftpConfig {
            root: root.into(),
            timeout: Duration::from_secs(1),
            retries: 10,
            max_transfers: 64,
            device: None,
        }
    }
}

/// Maps a client IP address to the DUT it belongs to, for boot events.
pub type ClientResolver = Arc<dyn Fn(Ipv4Addr) -> Option<KnownDut> + Send + Sync>;

/// What one transfer sends: a file, or bytes made on request.
#[derive(Debug)]
pub enum TftpContent {
    /// An open file and its size.
    File(File, u64),
    /// Bytes in memory (a generated boot script).
    Memory(Vec<u8>),
}

impl TftpContent {
    /// An open file, sized from its metadata; refused unless it is a
    /// regular file.
    pub fn from_file(file: File) -> Result<TftpContent, String> {
        let meta = file.metadata().map_err(|e| e.to_string())?;
        if !meta.is_file() {
            return Err("not a regular file".into());
        }
        Ok(TftpContent::File(file, meta.len()))
    }

    /// The number of bytes sent.
    pub fn len(&self) -> u64 {
        match self {
            TftpContent::File(_, n) => *n,
            TftpContent::Memory(v) => v.len() as u64,
        }
    }

    /// True when there is nothing to send.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        match self {
            TftpContent::File(f, _) => f.read_at(buf, offset),
            TftpContent::Memory(v) => {
                let start = usize::try_from(offset).unwrap_or(usize::MAX).min(v.len());
                let n = buf.len().min(v.len() - start);
                buf[..n].copy_from_slice(&v[start..start + n]);
                Ok(n)
            }
        }
    }
}

/// Names served without a file in the root: the server asks the provider
/// first, then (on `None`) looks in the root.
#[async_trait::async_trait]
pub trait DynamicFiles: Send + Sync {
    /// The content of `name` for `client`. `None`: not one of this
    /// provider's names. `Some(Err(reason))`: refused with "File not
    /// found"; the reason goes to the log and the DUT's boot timeline.
    async fn open(&self, name: &str, client: SocketAddr) -> Option<Result<TftpContent, String>>;
}

/// Why a file is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Outside the root, missing, or not a regular file.
    #[error("File not found")]
    NotFound,
}

/// Resolves `name` under `root` (which must be canonical). Refuses `..`,
/// names that resolve (through symlinks) outside the root, missing files
/// and non-regular files. Returns the open file and its size.
pub fn open_in_root(root: &Path, name: &str) -> Result<(File, u64), Refusal> {
    let rel = Path::new(name.trim_start_matches('/'));
    let mut clean = PathBuf::new();
    for c in rel.components() {
        match c {
            Component::Normal(p) => clean.push(p),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(Refusal::NotFound)
            }
        }
    }
    if clean.as_os_str().is_empty() {
        return Err(Refusal::NotFound);
    }
    let full = root
        .join(&clean)
        .canonicalize()
        .map_err(|_| Refusal::NotFound)?;
    if !full.starts_with(root) {
        return Err(Refusal::NotFound);
    }
    // O_NONBLOCK: opening a FIFO must not wait for a writer.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(&full)
        .map_err(|_| Refusal::NotFound)?;
    let meta = file.metadata().map_err(|_| Refusal::NotFound)?;
    if !meta.is_file() {
        return Err(Refusal::NotFound);
    }
    Ok((file, meta.len()))
}

/// The negotiated parameters of one transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// Block size.
    pub blksize: usize,
    /// Window size.
    pub windowsize: u64,
    /// Retransmission timeout.
    pub timeout: Duration,
    /// Whether an OACK is sent (some option was accepted).
    pub oack: bool,
}

/// Applies the client's options; returns the parameters and the OACK body.
pub fn negotiate(
    options: &[(String, String)],
    file_size: u64,
    default_timeout: Duration,
) -> (Negotiated, Vec<(&'static str, String)>) {
    let mut n = Negotiated {
        blksize: 512,
        windowsize: 1,
        timeout: default_timeout,
        oack: false,
    };
    let mut ack = Vec::new();
    for (name, value) in options {
        let Ok(v) = value.trim().parse::<u64>() else {
            debug!(option = %name, value = %value, "ignoring TFTP option with a non-integer value");
            continue;
        };
        match name.as_str() {
            "blksize" if v >= 8 => {
                n.blksize = usize::try_from(v).unwrap_or(MAX_BLKSIZE).min(MAX_BLKSIZE);
                ack.push(("blksize", n.blksize.to_string()));
            }
            "tsize" => ack.push(("tsize", file_size.to_string())),
            "timeout" if (1..=255).contains(&v) => {
                n.timeout = Duration::from_secs(v);
                ack.push(("timeout", v.to_string()));
            }
            "windowsize" if v >= 1 => {
                n.windowsize = v.min(MAX_WINDOWSIZE);
                ack.push(("windowsize", n.windowsize.to_string()));
            }
            _ => debug!(option = %name, "ignoring TFTP option"),
        }
    }
    n.oack = !ack.is_empty();
    (n, ack)
}

/// A TFTP server on one socket.
pub struct TftpServer {
    config: TftpConfig,
    socket: Arc<UdpSocket>,
    resolver: ClientResolver,
    events: Arc<dyn BootEventSink>,
    stop: Arc<AtomicBool>,
    active: Arc<AtomicUsize>,
    dynamic: Option<Arc<dyn DynamicFiles>>,
    /// Dynamic requests being prepared, by client and name: a client
    /// retransmitting its RRQ meanwhile must not start a second transfer.
    pending: Arc<Mutex<HashSet<(SocketAddr, String)>>>,
}

/// Stops a [`TftpServer`]'s transfers when dropped or told to.
#[derive(Debug, Clone)]
pub struct TftpStop(Arc<AtomicBool>);

impl TftpStop {
    /// Ends running transfers (within one timeout) and refuses new ones.
    pub fn stop(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl TftpServer {
    /// A server receiving requests on `socket`. The root is canonicalized
    /// here: an error names it if it does not exist.
    pub fn new(
        mut config: TftpConfig,
        socket: UdpSocket,
        resolver: ClientResolver,
        events: Arc<dyn BootEventSink>,
    ) -> Result<Self, crate::BootsError> {
        config.root = config
            .root
            .canonicalize()
            .map_err(|e| crate::BootsError::TftpRoot {
                root: config.root.clone(),
                reason: e.to_string(),
            })?;
        Ok(TftpServer {
            config,
            socket: Arc::new(socket),
            resolver,
            events,
            stop: Arc::new(AtomicBool::new(false)),
            active: Arc::new(AtomicUsize::new(0)),
            dynamic: None,
            pending: Arc::new(Mutex::new(HashSet::new())),
        })
    }

    /// Serves the names `dynamic` claims (before looking in the root).
    pub fn with_dynamic(mut self, dynamic: Arc<dyn DynamicFiles>) -> Self {
        self.dynamic = Some(dynamic);
        self
    }

    /// A handle that stops running transfers.
    pub fn stopper(&self) -> TftpStop {
        TftpStop(self.stop.clone())
    }

    /// Serves requests until the task is aborted.
    pub async fn run(self) {
        let mut buf = vec![0u8; 2048];
        info!(local = ?self.socket.local_addr().ok(), root = %self.config.root.display(), "TFTP server started");
        let local_ip = self.socket.local_addr().ok().map(|a| a.ip());
        loop {
            let (n, from) = match self.socket.recv_from(&mut buf).await {
                Ok(x) => x,
                Err(e) => {
                    warn!("TFTP receive error: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            let req = match packet::parse_request(&buf[..n]) {
                Ok(r) => r,
                Err(e) => {
                    debug!(%from, "dropping malformed TFTP packet: {e}");
                    continue;
                }
            };
            self.dispatch(req, from, local_ip).await;
        }
    }

    async fn dispatch(&self, req: Request, from: SocketAddr, local_ip: Option<IpAddr>) {
        let refuse = |code: u16, msg: String| async move {
            debug!(%from, "TFTP refused: {msg}");
            let _ = self.socket.send_to(&packet::error(code, &msg), from).await;
        };
        if req.write {
            return refuse(
                error_code::ILLEGAL_OPERATION,
                "Write support not implemented".into(),
            )
            .await;
        }
        if req.mode != "octet" {
            let msg = format!("Mode '{}' not supported", req.mode);
            self.record(&req.filename, from, None, Some(msg.clone()));
            return refuse(error_code::UNKNOWN_TID, msg).await;
        }
        if self.active.load(Ordering::SeqCst) >= self.config.max_transfers {
            return refuse(
                error_code::UNDEFINED,
                "Too many transfers, retry later".into(),
            )
            .await;
        }
        let Some(dynamic) = self.dynamic.clone() else {
            match open_in_root(&self.config.root, &req.filename) {
                Ok((file, size)) => self.start(req, from, local_ip, TftpContent::File(file, size)),
                Err(e) => {
                    self.record(&req.filename, from, None, Some(e.to_string()));
                    refuse(error_code::FILE_NOT_FOUND, e.to_string()).await;
                }
            }
            return;
        };
        let key = (from, req.filename.clone());
        if !self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.clone())
        {
            debug!(%from, file = %req.filename, "RRQ retransmitted while its file is being prepared");
            return;
        }
        let this = self.handle();
        self.active.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            let opened = match dynamic.open(&req.filename, from).await {
                Some(r) => r,
                None => open_in_root(&this.config.root, &req.filename)
                    .map(|(f, n)| TftpContent::File(f, n))
                    .map_err(|e| e.to_string()),
            };
            this.active.fetch_sub(1, Ordering::SeqCst);
            this.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&key);
            match opened {
                Ok(content) => this.start(req, from, local_ip, content),
                Err(e) => {
                    debug!(%from, file = %req.filename, "TFTP refused: {e}");
                    this.record(&req.filename, from, None, Some(e));
                    let msg = Refusal::NotFound.to_string();
                    let _ = this
                        .socket
                        .send_to(&packet::error(error_code::FILE_NOT_FOUND, &msg), from)
                        .await;
                }
            }
        });
    }

    /// A cheap copy of what transfers need (everything is shared).
    fn handle(&self) -> TftpServer {
        TftpServer {
            config: self.config.clone(),
            socket: self.socket.clone(),
            resolver: self.resolver.clone(),
            events: self.events.clone(),
            stop: self.stop.clone(),
            active: self.active.clone(),
            dynamic: self.dynamic.clone(),
            pending: self.pending.clone(),
        }
    }

    /// Starts the transfer of `content` to `from` on a thread of its own.
    fn start(
        &self,
        req: Request,
        from: SocketAddr,
        local_ip: Option<IpAddr>,
        content: TftpContent,
    ) {
        let size = content.len();
        // The transfer socket: a new port on the address the request came
        // to (the client checks replies come from the server it asked), in
        // the network namespace of the listening socket (which may have
        // been created in another namespace than this thread's).
        let bind_ip = match local_ip {
            Some(ip) if !ip.is_unspecified() => ip,
            _ => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        };
        let netns = netns_of(&self.socket);
        let device = self.config.device.clone();
        let (params, oack) = negotiate(&req.options, size, self.config.timeout);
        let retries = self.config.retries;
        let stop = self.stop.clone();
        let transfer = move |sock| Transfer {
            sock,
            content,
            size,
            params,
            oack,
            retries,
            stop,
        };
        self.active.fetch_add(1, Ordering::SeqCst);
        let active = self.active.clone();
        let resolver = self.resolver.clone();
        let events = self.events.clone();
        let filename = req.filename;
        let spawned = std::thread::Builder::new()
            .name("tftp-transfer".into())
            .spawn(move || {
                let started = Instant::now();
                let result = match transfer_socket(netns, bind_ip, device.as_deref(), from) {
                    Ok(sock) => transfer(sock).run(),
                    Err(e) => {
                        warn!("cannot open a TFTP transfer socket: {e}");
                        Err(format!("transfer socket: {e}"))
                    }
                };
                active.fetch_sub(1, Ordering::SeqCst);
                match &result {
                    Ok(bytes) => debug!(%from, file = %filename, bytes, elapsed = ?started.elapsed(), "TFTP transfer done"),
                    Err(e) => debug!(%from, file = %filename, "TFTP transfer failed: {e}"),
                }
                record_event(&resolver, &*events, &filename, from, result);
            });
        if let Err(e) = spawned {
            self.active.fetch_sub(1, Ordering::SeqCst);
            warn!("cannot start a TFTP transfer thread: {e}");
        }
    }

    fn record(&self, filename: &str, from: SocketAddr, bytes: Option<u64>, error: Option<String>) {
        let result = match (bytes, error) {
            (Some(b), None) => Ok(b),
            (_, e) => Err(e.unwrap_or_default()),
        };
        record_event(&self.resolver, &*self.events, filename, from, result);
    }
}

fn record_event(
    resolver: &ClientResolver,
    events: &dyn BootEventSink,
    filename: &str,
    from: SocketAddr,
    result: Result<u64, String>,
) {
    let IpAddr::V4(ip) = from.ip() else { return };
    let Some(dut) = resolver(ip) else { return };
    let (bytes_sent, error) = match result {
        Ok(b) => (Some(b), None),
        Err(e) => (None, Some(e)),
    };
    events.record(BootEvent {
        time: Utc::now(),
        mac: dut.mac,
        dut_id: Some(dut.id),
        kind: BootEventKind::Tftp {
            filename: filename.to_string(),
            client: from,
            bytes_sent,
            error,
        },
    });
}

/// The network namespace of `socket`, when it can be read (SIOCGSKNS) and
/// differs from this thread's.
fn netns_of(socket: &UdpSocket) -> Option<OwnedFd> {
    use std::os::fd::FromRawFd;
    use std::os::unix::fs::MetadataExt;
    const SIOCGSKNS: libc::c_ulong = 0x894C;
    // SAFETY: ioctl on a valid socket fd; returns a new fd or -1.
    let fd = unsafe { libc::ioctl(socket.as_raw_fd(), SIOCGSKNS as _) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` was just returned to us and is owned by nobody else.
    let ns = unsafe { OwnedFd::from_raw_fd(fd) };
    let theirs = File::from(ns.try_clone().ok()?).metadata().ok()?.ino();
    let ours = std::fs::metadata("/proc/thread-self/ns/net").ok()?.ino();
    (theirs != ours).then_some(ns)
}

/// Opens the socket of one transfer, connected to the client. Runs on the
/// transfer's own thread, which first enters `netns` if given.
fn transfer_socket(
    netns: Option<OwnedFd>,
    ip: IpAddr,
    device: Option<&str>,
    client: SocketAddr,
) -> Result<StdUdpSocket, String> {
    if let Some(ns) = netns {
        // SAFETY: setns on a namespace fd; affects this thread only.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(format!("setns: {}", io::Error::last_os_error()));
        }
    }
    let sock = bind_udp(SocketAddr::new(ip, 0), device, false).map_err(|e| e.to_string())?;
    sock.set_nonblocking(false).map_err(|e| e.to_string())?;
    sock.connect(client).map_err(|e| e.to_string())?;
    Ok(sock)
}

/// One transfer, run on its own thread with blocking I/O.
struct Transfer {
    sock: StdUdpSocket,
    content: TftpContent,
    size: u64,
    params: Negotiated,
    oack: Vec<(&'static str, String)>,
    retries: u32,
    stop: Arc<AtomicBool>,
}

impl Transfer {
    /// Sends the file; returns the number of bytes sent.
    fn run(self) -> Result<u64, String> {
        let blksize = self.params.blksize;
        let bs = blksize as u64;
        // Number of DATA packets: a final short (maybe empty) block always.
        let blocks = self.size / bs + 1;
        let mut rbuf = [0u8; 512];
        let mut out = WindowSender::new(blksize, self.params.windowsize);
        self.sock
            .set_read_timeout(Some(self.params.timeout))
            .map_err(|e| e.to_string())?;

        if self.params.oack {
            let oack = packet::oack(&self.oack);
            self.await_ack(&oack, 0, &mut rbuf)?;
            self.sock
                .set_read_timeout(Some(self.params.timeout))
                .map_err(|e| e.to_string())?;
        }

        // `base` = first unacknowledged block (1-based, u64: no wrap).
        let mut base: u64 = 1;
        let mut tries = 0;
        while base <= blocks {
            if self.stop.load(Ordering::Relaxed) {
                return Err("server stopping".into());
            }
            let end = (base + self.params.windowsize - 1).min(blocks);
            out.send(&self.sock, &self.content, self.size, base, end)?;
            // Wait for an ACK that moves the window. The socket's read
            // timeout stays at the transfer's timeout (no setsockopt per
            // block): a stray packet can delay a retransmission by at most
            // one more timeout.
            let deadline = Instant::now() + self.params.timeout;
            let mut advanced = false;
            loop {
                if Instant::now() >= deadline {
                    break;
                }
                match self.sock.recv(&mut rbuf) {
                    Ok(n) => match packet::parse_client_packet(&rbuf[..n]) {
                        ClientPacket::Ack(a) => {
                            // Map the 16-bit number onto [base-1, end].
                            let delta = a.wrapping_sub((base - 1) as u16) as u64;
                            if delta >= 1 && base - 1 + delta <= end {
                                base += delta;
                                advanced = true;
                                break;
                            }
                            // Duplicate or stale: ignore (no Sorcerer's Apprentice).
                        }
                        ClientPacket::Error(code) => {
                            return Err(format!("client sent ERROR {code}"))
                        }
                        ClientPacket::Other => {}
                    },
                    Err(e) if is_timeout(&e) => break,
                    // ICMP port unreachable: the client is gone.
                    Err(e) => return Err(format!("receive: {e}")),
                }
            }
            if advanced {
                tries = 0;
            } else {
                tries += 1;
                if tries > self.retries {
                    return Err(format!("no ACK for block {base} after {} tries", tries));
                }
            }
        }
        Ok(self.size)
    }

    /// Sends `pkt` until block `block` is acknowledged (used for the OACK).
    fn await_ack(&self, pkt: &[u8], block: u16, rbuf: &mut [u8]) -> Result<(), String> {
        for _ in 0..=self.retries {
            if self.stop.load(Ordering::Relaxed) {
                return Err("server stopping".into());
            }
            self.send(pkt)?;
            let deadline = Instant::now() + self.params.timeout;
            loop {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                self.sock
                    .set_read_timeout(Some(deadline - now))
                    .map_err(|e| e.to_string())?;
                match self.sock.recv(rbuf) {
                    Ok(n) => match packet::parse_client_packet(&rbuf[..n]) {
                        ClientPacket::Ack(a) if a == block => return Ok(()),
                        ClientPacket::Error(code) => {
                            return Err(format!("client sent ERROR {code}"))
                        }
                        _ => {}
                    },
                    Err(e) if is_timeout(&e) => break,
                    Err(e) => return Err(format!("receive: {e}")),
                }
            }
        }
        Err("no ACK for the OACK".into())
    }

    fn send(&self, pkt: &[u8]) -> Result<(), String> {
        loop {
            match self.sock.send(pkt) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Transient: the socket buffer is full; the window logic retries.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => return Ok(()),
                Err(e) => return Err(format!("send: {e}")),
            }
        }
    }
}

/// Sends DATA blocks from a reusable buffer: the file bytes of up to
/// [`WindowSender::BATCH_BYTES`] worth of blocks are read with one `pread`
/// and sent with one `sendmmsg` (each message a 4-byte header and its slice
/// of the buffer), so a window costs a few system calls, not two per block.
struct WindowSender {
    blksize: usize,
    /// Blocks per read and `sendmmsg` call.
    batch: usize,
    data: Vec<u8>,
    headers: Vec<[u8; 4]>,
    mmsg: MultiHeaders<()>,
    /// No destination address: the socket is connected.
    addrs: Vec<Option<()>>,
}

impl WindowSender {
    /// Most file bytes buffered per transfer (a window of large blocks is
    /// sent in several batches).
    const BATCH_BYTES: usize = 256 << 10;

    fn new(blksize: usize, windowsize: u64) -> WindowSender {
        let window = usize::try_from(windowsize).unwrap_or(usize::MAX);
        let batch = window.min(Self::BATCH_BYTES / blksize).max(1);
        WindowSender {
            blksize,
            batch,
            data: vec![0; batch * blksize],
            headers: vec![[0; 4]; batch],
            mmsg: MultiHeaders::preallocate(batch, None),
            addrs: vec![None; batch],
        }
    }

    /// Sends blocks `first..=last` (1-based) of `content` (of `size` bytes).
    fn send(
        &mut self,
        sock: &StdUdpSocket,
        content: &TftpContent,
        size: u64,
        first: u64,
        last: u64,
    ) -> Result<(), String> {
        let bs = self.blksize as u64;
        let mut b = first;
        while b <= last {
            let count = usize::try_from(last - b + 1)
                .unwrap_or(usize::MAX)
                .min(self.batch);
            let offset = (b - 1) * bs;
            let want = (count as u64 * bs).min(size.saturating_sub(offset)) as usize;
            let got = read_full(content, &mut self.data[..want], offset)?;
            for (i, h) in self.headers[..count].iter_mut().enumerate() {
                h[..2].copy_from_slice(&packet::opcode::DATA.to_be_bytes());
                h[2..].copy_from_slice(&((b + i as u64) as u16).to_be_bytes());
            }
            // Block i carries data[i*bs .. (i+1)*bs] cut to what was read: a
            // short (maybe empty) last block ends the file.
            let iovs: Vec<[IoSlice<'_>; 2]> = (0..count)
                .map(|i| {
                    let start = (i * self.blksize).min(got);
                    let end = ((i + 1) * self.blksize).min(got);
                    [
                        IoSlice::new(&self.headers[i]),
                        IoSlice::new(&self.data[start..end]),
                    ]
                })
                .collect();
            let mut done = 0;
            while done < count {
                match sendmmsg(
                    sock.as_raw_fd(),
                    &mut self.mmsg,
                    &iovs[done..],
                    &self.addrs[..count - done],
                    [],
                    MsgFlags::empty(),
                ) {
                    // (Zero sent cannot happen on a blocking socket; were
                    // it to, skipping on keeps the loop bounded.)
                    Ok(r) => done += r.count().max(1),
                    Err(Errno::EINTR) => {}
                    // Transient: the socket buffer is full; the window
                    // logic retransmits what the client did not get.
                    Err(Errno::ENOBUFS) => break,
                    Err(e) => return Err(format!("send: {e}")),
                }
            }
            b += count as u64;
        }
        Ok(())
    }
}

/// Reads `buf.len()` bytes at `offset`, fewer only if the content ends
/// first (a file that shrank: what there is gets sent).
fn read_full(content: &TftpContent, buf: &mut [u8], offset: u64) -> Result<usize, String> {
    let mut got = 0;
    while got < buf.len() {
        match content.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    Ok(got)
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

#[cfg(test)]
mod tests;
