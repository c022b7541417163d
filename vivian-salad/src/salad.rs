//! The multiplexer: consoles, machines, their TCP ports, serial hot-plug.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Buf;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use vivian_core::console::{ConsoleMachine, LogChunk, ResetOutcome};

use crate::config::SaladConfig;
use crate::console::{spawn_console, Console, ConsoleKind};
use crate::machine::{validate_machine_id, Client, ClientInfo, Machine};

/// Errors of the multiplexer.
#[derive(Debug, thiserror::Error)]
pub enum SaladError {
    /// The machine id is not acceptable.
    #[error("invalid machine id {id:?}: {reason}")]
    InvalidMachineId {
        /// The id.
        id: String,
        /// Why.
        reason: String,
    },
    /// No machine has this id.
    #[error("unknown machine {0:?}")]
    UnknownMachine(String),
    /// A listening socket could not be set up.
    #[error("cannot listen for {what} on {addr}: {source}")]
    Bind {
        /// Which socket (netconsole, a machine's port...).
        what: String,
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: io::Error,
    },
    /// The log directory cannot be used.
    #[error("cannot use the console log directory {path} (SALAD_LOG_DIR): {source}")]
    LogDir {
        /// The directory.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// Console logs are disabled (no log directory) or the machine's log
    /// file could not be opened.
    #[error("the console log of machine {0:?} is not available (no log directory, or it could not be opened)")]
    LogUnavailable(String),
    /// A read-write client is already attached.
    #[error("machine {0:?}: {msg}", msg = crate::BUSY_MESSAGE)]
    Busy(String),
    /// A console with this name already exists.
    #[error("a console named {0:?} already exists")]
    DuplicateConsole(String),
    /// A console reset was attempted and failed.
    #[error("console reset of machine {id:?} failed: {reason}")]
    ResetFailed {
        /// The machine.
        id: String,
        /// What failed.
        reason: String,
    },
    /// Reading a log failed.
    #[error("reading the console log of machine {id:?} failed: {source}")]
    LogRead {
        /// The machine.
        id: String,
        /// The error.
        source: io::Error,
    },
}

/// One console as the multiplexer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleInfo {
    /// `netconsole@<ip>:<port>`, the serial device path, or the name given
    /// to [`Salad::add_stream_console`].
    pub name: String,
    /// What it is.
    pub kind: ConsoleKind,
    /// The machine it is bound to.
    pub machine_id: Option<String>,
}

pub(crate) struct Inner {
    pub(crate) config: SaladConfig,
    machines: Mutex<BTreeMap<String, Arc<Machine>>>,
    consoles: Mutex<HashMap<String, Arc<Console>>>,
    /// console id (serial port identity) → machine id: bindings survive
    /// unplug/replug and reconnects of the same port.
    console_ids: Mutex<HashMap<String, String>>,
    shutdown: watch::Sender<bool>,
    netconsole_addr: Option<SocketAddr>,
    /// Wakes the log flusher before its period (a machine's log buffer is
    /// full).
    log_flush: Arc<Notify>,
}

impl Inner {
    pub(crate) fn shutdown_rx(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    pub(crate) fn is_shut_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    pub(crate) fn add_console(self: &Arc<Self>, console: &Arc<Console>) {
        let old = self
            .consoles
            .lock()
            .unwrap()
            .insert(console.name.clone(), console.clone());
        if let Some(old) = old {
            tracing::warn!(console = %console.name, "a console with the same name existed: closing it");
            old.close();
        }
        tracing::info!(console = %console.name, console_id = ?console.console_id, "new console");
        if let Some(cid) = &console.console_id {
            let known = self.console_ids.lock().unwrap().get(cid).cloned();
            if let Some(mid) = known {
                tracing::info!(console = %console.name, machine = %mid, "re-associating the console to its machine");
                self.bind(console, &mid);
            }
        }
    }

    pub(crate) fn remove_console(&self, console: &Arc<Console>) {
        let mut consoles = self.consoles.lock().unwrap();
        if consoles
            .get(&console.name)
            .is_some_and(|c| Arc::ptr_eq(c, console))
        {
            consoles.remove(&console.name);
        }
        drop(consoles);
        if let Some(m) = console.machine() {
            let mut st = m.state.lock().unwrap();
            if st
                .console
                .as_ref()
                .and_then(|w| w.upgrade())
                .is_some_and(|c| Arc::ptr_eq(&c, console))
            {
                st.console = None;
            }
        }
    }

    /// Bind `console` to machine `id` (a `SALAD.machine_id=` line).
    pub(crate) fn bind(self: &Arc<Self>, console: &Arc<Console>, id: &str) {
        let machine = match self.get_or_create_machine(id) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(console = %console.name, "ignoring SALAD.machine_id: {e}");
                return;
            }
        };
        let old = console.machine.lock().unwrap().replace(machine.clone());
        match &old {
            Some(o) if o.id != machine.id => {
                tracing::warn!(console = %console.name, "the console's machine changed from {} to {}", o.id, machine.id);
                let mut st = o.state.lock().unwrap();
                if st
                    .console
                    .as_ref()
                    .and_then(|w| w.upgrade())
                    .is_some_and(|c| Arc::ptr_eq(&c, console))
                {
                    st.console = None;
                }
            }
            Some(_) => {}
            None => {
                tracing::info!(console = %console.name, "the console is now associated to {}", machine.id)
            }
        }
        machine.state.lock().unwrap().console = Some(Arc::downgrade(console));
        if let Some(cid) = &console.console_id {
            self.console_ids
                .lock()
                .unwrap()
                .insert(cid.clone(), machine.id.clone());
        }
    }

    /// The live console bound to `machine`, if any.
    fn machine_console(&self, machine: &Arc<Machine>) -> Option<Arc<Console>> {
        let current = machine
            .state
            .lock()
            .unwrap()
            .console
            .as_ref()
            .and_then(|w| w.upgrade());
        if let Some(c) = current {
            if !c.is_closed() && c.machine().is_some_and(|m| Arc::ptr_eq(&m, machine)) {
                return Some(c);
            }
        }
        let found = self
            .consoles
            .lock()
            .unwrap()
            .values()
            .find(|c| !c.is_closed() && c.machine().is_some_and(|m| Arc::ptr_eq(&m, machine)))
            .cloned();
        machine.state.lock().unwrap().console = found.as_ref().map(Arc::downgrade);
        found
    }

    /// Bytes from a read-write client to the machine's console.
    fn send_to_machine(&self, machine: &Arc<Machine>, data: &[u8]) {
        match self.machine_console(machine) {
            Some(c) => c.send(data),
            None => tracing::warn!(
                machine = %machine.id,
                "no console is associated to the machine: dropped {} bytes of input",
                data.len()
            ),
        }
    }

    pub(crate) fn find_machine(&self, id: &str) -> Option<Arc<Machine>> {
        self.machines.lock().unwrap().get(id).cloned()
    }

    pub(crate) fn get_or_create_machine(
        self: &Arc<Self>,
        id: &str,
    ) -> Result<Arc<Machine>, SaladError> {
        validate_machine_id(id).map_err(|reason| SaladError::InvalidMachineId {
            id: id.into(),
            reason,
        })?;
        let mut machines = self.machines.lock().unwrap();
        if let Some(m) = machines.get(id) {
            return Ok(m.clone());
        }
        let bind = |what: &str| -> Result<TcpListener, SaladError> {
            let addr = SocketAddr::new(self.config.machine_bind_ip, 0);
            let err = |source| SaladError::Bind {
                what: format!("the {what} port of machine {id}"),
                addr,
                source,
            };
            let l = StdTcpListener::bind(addr).map_err(err)?;
            l.set_nonblocking(true).map_err(err)?;
            TcpListener::from_std(l).map_err(err)
        };
        let rw = bind("read-write")?;
        let ro = bind("read-only")?;
        let port = |l: &TcpListener| l.local_addr().map(|a| a.port()).unwrap_or(0);
        let machine = Arc::new(Machine::new(
            id.to_string(),
            port(&rw),
            port(&ro),
            self.config.log_dir.as_deref(),
            self.config.max_client_backlog,
            self.log_flush.clone(),
        ));
        tracing::info!(
            machine = id,
            tcp_port = machine.rw_port,
            tcp_port_logs = machine.ro_port,
            "new machine"
        );
        machines.insert(id.to_string(), machine.clone());
        drop(machines);
        tokio::spawn(accept_loop(self.clone(), machine.clone(), rw, true));
        tokio::spawn(accept_loop(self.clone(), machine.clone(), ro, false));
        Ok(machine)
    }
}

fn machine_info(m: &Machine) -> ConsoleMachine {
    ConsoleMachine {
        id: m.id.clone(),
        tcp_port: m.rw_port,
        has_client: m.has_rw_client(),
        tcp_port_logs: m.ro_port,
    }
}

/// Write all of `data` to a shared stream.
async fn write_all_shared(tcp: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        tcp.writable().await?;
        match tcp.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn shutdown_socket(tcp: &TcpStream) {
    let _ = socket2::SockRef::from(tcp).shutdown(std::net::Shutdown::Both);
}

async fn accept_loop(inner: Arc<Inner>, machine: Arc<Machine>, listener: TcpListener, rw: bool) {
    let mut shutdown = inner.shutdown_rx();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(machine = %machine.id, "accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let tcp = Arc::new(stream);
        match machine.add_client(rw, Some(peer), Some(tcp.clone())) {
            Ok(client) => {
                tracing::info!(machine = %machine.id, %peer, rw, "client connected");
                tokio::spawn(client_loop(inner.clone(), machine.clone(), client, tcp));
            }
            Err(msg) => {
                tracing::warn!(machine = %machine.id, %peer, "refusing a second read-write client");
                tokio::spawn(async move {
                    let line = format!("ERROR: {msg}\r\n");
                    let _ = tokio::time::timeout(
                        Duration::from_secs(5),
                        write_all_shared(&tcp, line.as_bytes()),
                    )
                    .await;
                    shutdown_socket(&tcp);
                });
            }
        }
    }
}

async fn client_loop(
    inner: Arc<Inner>,
    machine: Arc<Machine>,
    client: Arc<Client>,
    tcp: Arc<TcpStream>,
) {
    let mut buf = vec![0u8; 4096];
    let mut shutdown = inner.shutdown_rx();
    loop {
        let has_pending = {
            let st = client.state.lock().unwrap();
            if st.closed {
                break;
            }
            !st.pending.is_empty()
        };
        tokio::select! {
            _ = client.notify.notified() => {}
            r = tcp.writable(), if has_pending => {
                if r.is_err() || client.flush_tcp().is_err() {
                    break;
                }
            }
            r = tcp.readable() => {
                if r.is_err() { break; }
                match tcp.try_read(&mut buf) {
                    Ok(0) => break,
                    // Bytes of a read-only client are discarded.
                    Ok(n) => if client.rw { inner.send_to_machine(&machine, &buf[..n]) },
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => break,
                }
            }
            _ = shutdown.wait_for(|s| *s) => break,
        }
    }
    tracing::info!(machine = %machine.id, peer = ?client.peer, rw = client.rw, "client disconnected");
    machine.remove_client(client.id);
    shutdown_socket(&tcp);
}

async fn netconsole_loop(inner: Arc<Inner>, listener: TcpListener) {
    let mut shutdown = inner.shutdown_rx();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let name = format!("netconsole@{}:{}", peer.ip(), peer.port());
                spawn_console(&inner, name, None, ConsoleKind::Net, stream);
            }
            Err(e) => {
                tracing::warn!("netconsole accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Serial port identity that survives unplug/replug: the sysfs `port`
/// attribute of a legacy UART, or the USB port the adapter hangs off, else
/// the device path as matched.
fn serial_console_id(sysfs_root: &Path, path: &Path, canonical: &Path) -> String {
    if let Some(name) = canonical.file_name() {
        let class = sysfs_root.join("class/tty").join(name);
        if let Ok(dev) = class.canonicalize() {
            if let Ok(port) = std::fs::read_to_string(dev.join("port")) {
                let port = port.trim();
                if !port.is_empty() {
                    return format!("port:{port}");
                }
            }
            if let Some(usb) = usb_port_of(&dev) {
                if let Some(n) = usb.file_name() {
                    return format!("usb:{}", n.to_string_lossy());
                }
            }
        }
    }
    format!("path:{}", path.display())
}

/// The USB port (a sysfs directory with a `port` entry) above a tty's sysfs
/// directory.
pub(crate) fn usb_port_of(dev: &Path) -> Option<PathBuf> {
    if !dev.to_string_lossy().contains("usb") {
        return None;
    }
    let mut p = dev.parent();
    while let Some(d) = p {
        if d.join("port").is_dir() {
            return Some(d.to_path_buf());
        }
        p = d.parent();
    }
    None
}

/// The character devices the serial globs match, each with the device
/// number it names (symbolic links followed).
///
/// One `stat` per match and nothing else: resolving each path's symbolic
/// links here (a `readlink` per component), when a scan ran every 500 ms,
/// cost the multiplexer more than a tenth of its CPU at 500 ports under
/// `salad-bench`. The
/// canonical path is only needed for a port being opened
/// ([`serial_console_id`]); the device number tells as well whether a path
/// now names another device (a `by-path` link re-pointed after a replug).
fn scan_serial(globs: &[String]) -> BTreeMap<PathBuf, u64> {
    let mut found = BTreeMap::new();
    for g in globs {
        let Ok(paths) = glob::glob(g) else { continue };
        for p in paths.flatten() {
            if let Ok(m) = std::fs::metadata(&p) {
                if m.file_type().is_char_device() {
                    found.insert(p, m.rdev());
                }
            }
        }
    }
    found
}

/// Opening a new serial port is retried this many scans before the port is
/// marked broken (until it disappears).
const SERIAL_OPEN_ATTEMPTS: u32 = 5;

async fn serial_loop(inner: Arc<Inner>) {
    let mut shutdown = inner.shutdown_rx();
    let mut opened: HashMap<PathBuf, (u64, Arc<Console>)> = HashMap::new();
    let mut attempts: HashMap<PathBuf, u32> = HashMap::new();
    let mut broken: HashSet<PathBuf> = HashSet::new();
    let globs = inner.config.serial_globs.clone();
    let mut watch = match crate::hotplug::DirWatch::new() {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(
                "cannot watch for serial ports being plugged in ({e}): scanning every {:?}",
                inner.config.scan_interval
            );
            None
        }
    };
    loop {
        // A directory watched for the first time may have gained ports
        // before: scan it once more right after.
        let mut rescan = watch.as_mut().is_some_and(|w| w.update(&globs));
        let scanned = Instant::now();
        let scan_globs = globs.clone();
        let found = tokio::task::spawn_blocking(move || scan_serial(&scan_globs))
            .await
            .unwrap_or_default();
        opened.retain(|p, (rdev, c)| {
            let keep = found.get(p) == Some(rdev) && !c.is_closed();
            if !keep {
                tracing::info!(port = %p.display(), "the serial device got removed");
                c.close();
            }
            keep
        });
        broken.retain(|p| found.contains_key(p));
        attempts.retain(|p, _| found.contains_key(p));
        for (p, rdev) in &found {
            if opened.contains_key(p) || broken.contains(p) {
                continue;
            }
            match crate::tty::Tty::open(p, inner.config.baud_rate) {
                Ok(stream) => {
                    let n = attempts.remove(p).unwrap_or(0);
                    let canon = p.canonicalize().unwrap_or_else(|_| p.clone());
                    let cid = serial_console_id(&inner.config.sysfs_root, p, &canon);
                    tracing::info!(port = %p.display(), console_id = %cid, "found a new serial device after {n} failed attempts");
                    let c = spawn_console(
                        &inner,
                        p.display().to_string(),
                        Some(cid),
                        ConsoleKind::Serial { path: p.clone() },
                        stream,
                    );
                    opened.insert(p.clone(), (*rdev, c));
                }
                Err(e) => {
                    let n = attempts.entry(p.clone()).or_default();
                    *n += 1;
                    if *n >= SERIAL_OPEN_ATTEMPTS {
                        tracing::error!(port = %p.display(), "could not open the serial port after {n} attempts, ignoring it until it disappears: {e}");
                        broken.insert(p.clone());
                        // Not retried any more: no reason to poll for it.
                        attempts.remove(p);
                    }
                }
            }
        }
        // Until the next scan: a change in a watched directory, or every
        // scan interval a look at what needs a scan anyway (a port to
        // retry, a console that closed on its own, the periodic full scan,
        // no watch at all). That look costs no system call.
        while !rescan {
            tokio::select! {
                _ = tokio::time::sleep(inner.config.scan_interval) => {}
                r = crate::hotplug::changed(watch.as_mut()) => {
                    if let Err(e) = r {
                        tracing::warn!(
                            "watching for serial ports failed ({e}): scanning every {:?}",
                            inner.config.scan_interval
                        );
                        watch = None;
                    }
                    break;
                }
                _ = shutdown.wait_for(|s| *s) => break,
            }
            rescan = watch.is_none()
                || !attempts.is_empty()
                || opened.values().any(|(_, c)| c.is_closed())
                || scanned.elapsed() >= crate::hotplug::FULL_SCAN_PERIOD;
        }
        if *shutdown.borrow() {
            break;
        }
    }
    for (_, (_, c)) in opened {
        c.close();
    }
}

/// How often buffered console bytes are written to the machines' logs (a
/// buffer reaching 64 KiB is written at once). Reading a log through the
/// multiplexer (the bytes a client missed) flushes that machine first; this
/// period bounds how far behind the files are for whoever reads them
/// directly (`tail -f`), and what a crash could lose. A `write` to a log
/// costs about the same whatever its size (ext4 marks the inode dirty for
/// each), so the period sets the cost: at 500 busy consoles, 250 ms meant
/// 2,000 `write`s per second, 7.5 % of the multiplexer's CPU under `perf`
/// (`salad-bench --serial --chunk-ms 100`); one second makes that a quarter.
const LOG_FLUSH_PERIOD: Duration = Duration::from_secs(1);

impl Inner {
    /// Write every machine's buffered log bytes, on the blocking pool (file
    /// writes never stall the console data path).
    async fn flush_logs(&self) {
        let machines: Vec<_> = self.machines.lock().unwrap().values().cloned().collect();
        let _ = tokio::task::spawn_blocking(move || {
            for m in machines {
                m.flush_log();
            }
        })
        .await;
    }
}

async fn log_flush_loop(inner: Arc<Inner>) {
    let mut shutdown = inner.shutdown_rx();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(LOG_FLUSH_PERIOD) => {}
            _ = inner.log_flush.notified() => {}
            _ = shutdown.wait_for(|s| *s) => break,
        }
        inner.flush_logs().await;
    }
}

/// The console multiplexer. Cheap to clone (a handle).
///
/// Start it with [`Salad::start`] inside a tokio runtime; serve its HTTP API
/// with [`crate::serve_http`]; stop it with [`Salad::shutdown`].
#[derive(Clone)]
pub struct Salad {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Salad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Salad")
            .field("netconsole_addr", &self.inner.netconsole_addr)
            .finish_non_exhaustive()
    }
}

impl Salad {
    /// Create the log directory, bind the netconsole listener and start the
    /// serial port scanner. Must run inside a tokio runtime.
    pub async fn start(config: SaladConfig) -> Result<Salad, SaladError> {
        if let Some(dir) = &config.log_dir {
            std::fs::create_dir_all(dir).map_err(|source| SaladError::LogDir {
                path: dir.clone(),
                source,
            })?;
        }
        let netconsole = match config.netconsole_addr {
            Some(addr) => {
                Some(
                    TcpListener::bind(addr)
                        .await
                        .map_err(|source| SaladError::Bind {
                            what: "netconsoles (SALAD_TCPCONSOLE_PORT)".into(),
                            addr,
                            source,
                        })?,
                )
            }
            None => None,
        };
        let netconsole_addr = netconsole.as_ref().and_then(|l| l.local_addr().ok());
        let inner = Arc::new(Inner {
            config,
            machines: Mutex::new(BTreeMap::new()),
            consoles: Mutex::new(HashMap::new()),
            console_ids: Mutex::new(HashMap::new()),
            shutdown: watch::Sender::new(false),
            netconsole_addr,
            log_flush: Arc::new(Notify::new()),
        });
        if let Some(l) = netconsole {
            tracing::info!(addr = ?netconsole_addr, "listening for netconsoles");
            tokio::spawn(netconsole_loop(inner.clone(), l));
        }
        if !inner.config.serial_globs.is_empty() {
            tokio::spawn(serial_loop(inner.clone()));
        }
        tokio::spawn(log_flush_loop(inner.clone()));
        Ok(Salad { inner })
    }

    /// The configuration in force.
    pub fn config(&self) -> &SaladConfig {
        &self.inner.config
    }

    /// Where netconsoles connect (the actual port when 0 was asked).
    pub fn netconsole_addr(&self) -> Option<SocketAddr> {
        self.inner.netconsole_addr
    }

    /// Every machine, sorted by id.
    pub fn machines(&self) -> Vec<ConsoleMachine> {
        let machines: Vec<_> = self
            .inner
            .machines
            .lock()
            .unwrap()
            .values()
            .cloned()
            .collect();
        machines.iter().map(|m| machine_info(m)).collect()
    }

    /// A machine, created (with its two ports) if unknown.
    pub fn machine(&self, id: &str) -> Result<ConsoleMachine, SaladError> {
        let m = self.inner.get_or_create_machine(id)?;
        Ok(machine_info(&m))
    }

    /// A machine, if known.
    pub fn find_machine(&self, id: &str) -> Option<ConsoleMachine> {
        self.inner.find_machine(id).map(|m| machine_info(&m))
    }

    /// The current log size of a known machine and its connected clients.
    pub fn clients(&self, id: &str) -> Result<(u64, Vec<ClientInfo>), SaladError> {
        let m = self
            .inner
            .find_machine(id)
            .ok_or_else(|| SaladError::UnknownMachine(id.into()))?;
        Ok(m.clients())
    }

    /// Every live console.
    pub fn consoles(&self) -> Vec<ConsoleInfo> {
        let mut v: Vec<ConsoleInfo> = self
            .inner
            .consoles
            .lock()
            .unwrap()
            .values()
            .filter(|c| !c.is_closed())
            .map(|c| ConsoleInfo {
                name: c.name.clone(),
                kind: c.kind.clone(),
                machine_id: c.machine().map(|m| m.id.clone()),
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Add a console given as a byte stream (for example one end of
    /// `tokio::io::duplex`, or a simulated DUT): it behaves as a netconsole
    /// named `name`.
    pub fn add_stream_console<S>(&self, name: &str, stream: S) -> Result<(), SaladError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        if self.inner.consoles.lock().unwrap().contains_key(name) {
            return Err(SaladError::DuplicateConsole(name.into()));
        }
        spawn_console(
            &self.inner,
            name.to_string(),
            None,
            ConsoleKind::Stream,
            stream,
        );
        Ok(())
    }

    /// Attach in-process to a machine's console (created if unknown), as a
    /// read-write client (one at a time, else [`SaladError::Busy`]) or a
    /// read-only observer.
    pub fn attach(&self, id: &str, rw: bool) -> Result<LocalAttachment, SaladError> {
        let machine = self.inner.get_or_create_machine(id)?;
        let client = machine
            .add_client(rw, None, None)
            .map_err(|_| SaladError::Busy(id.into()))?;
        let start_offset = client.start_offset;
        let guard = Arc::new(AttachGuard {
            machine: machine.clone(),
            client: client.clone(),
        });
        Ok(LocalAttachment {
            reader: LocalReader {
                client,
                _guard: guard.clone(),
            },
            writer: LocalWriter {
                inner: self.inner.clone(),
                machine,
                rw,
                _guard: guard,
            },
            start_offset,
        })
    }

    /// Read up to `max_len` bytes of a known machine's console log from
    /// `offset`.
    pub async fn read_log(
        &self,
        id: &str,
        offset: u64,
        max_len: usize,
    ) -> Result<LogChunk, SaladError> {
        let m = self
            .inner
            .find_machine(id)
            .ok_or_else(|| SaladError::UnknownMachine(id.into()))?;
        let Some(path) = m.log_path() else {
            return Err(SaladError::LogUnavailable(id.into()));
        };
        let (data, size) = tokio::task::spawn_blocking(move || {
            // Everything before `size` is in the file once flushed; bytes
            // flushed after it are not returned, so `size` stays an upper
            // bound of what the chunk holds.
            let size = m.flush_log();
            let len = (size.saturating_sub(offset) as usize).min(max_len);
            crate::machine::read_log_file(&path, offset, len).map(|d| (d, size))
        })
        .await
        .map_err(|e| SaladError::LogRead {
            id: id.into(),
            source: io::Error::other(e),
        })?
        .map_err(|source| SaladError::LogRead {
            id: id.into(),
            source,
        })?;
        Ok(LogChunk { offset, data, size })
    }

    /// Reset (power-cycle) the console adapter of a machine (created if
    /// unknown). Only USB serial adapters on hubs with per-port power
    /// switching can be reset; anything else is
    /// [`ResetOutcome::Unsupported`].
    pub async fn reset(&self, id: &str) -> Result<ResetOutcome, SaladError> {
        let machine = self.inner.get_or_create_machine(id)?;
        let Some(console) = self.inner.machine_console(&machine) else {
            return Ok(ResetOutcome::Unsupported("No console associated".into()));
        };
        let ConsoleKind::Serial { path } = &console.kind else {
            return Ok(ResetOutcome::Unsupported(
                "Reset unsupported on this console".into(),
            ));
        };
        crate::reset::usb_reset(&self.inner.config, path, id).await
    }

    /// Stop everything: listeners, consoles, clients; flush the logs.
    pub async fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
        let consoles: Vec<_> = self
            .inner
            .consoles
            .lock()
            .unwrap()
            .drain()
            .map(|(_, c)| c)
            .collect();
        for c in consoles {
            c.close();
        }
        let machines: Vec<_> = self
            .inner
            .machines
            .lock()
            .unwrap()
            .values()
            .cloned()
            .collect();
        for m in machines {
            m.close_all_clients();
        }
        self.inner.flush_logs().await;
        // Let the tasks see the signal.
        tokio::task::yield_now().await;
    }

    /// Whether [`Salad::shutdown`] was called.
    pub fn is_shut_down(&self) -> bool {
        self.inner.is_shut_down()
    }
}

struct AttachGuard {
    machine: Arc<Machine>,
    client: Arc<Client>,
}

impl Drop for AttachGuard {
    fn drop(&mut self) {
        self.machine.remove_client(self.client.id);
    }
}

/// An in-process attachment to a machine's console (see [`Salad::attach`]).
pub struct LocalAttachment {
    /// Console output from the moment of attaching.
    pub reader: LocalReader,
    /// Console input (ignored for a read-only attachment).
    pub writer: LocalWriter,
    /// Log offset of the first byte `reader` yields.
    pub start_offset: u64,
}

/// Read half of a [`LocalAttachment`]. Yields end of stream when the
/// multiplexer shuts down, and an error if the reader fell more than
/// `max_client_backlog` bytes behind.
pub struct LocalReader {
    client: Arc<Client>,
    _guard: Arc<AttachGuard>,
}

impl AsyncRead for LocalReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut st = self.client.state.lock().unwrap();
        if !st.pending.is_empty() {
            let n = st.pending.len().min(buf.remaining());
            buf.put_slice(&st.pending[..n]);
            st.pending.advance(n);
            return Poll::Ready(Ok(()));
        }
        if st.overflowed {
            return Poll::Ready(Err(io::Error::other(
                "console reader fell too far behind and was detached; fetch the missed bytes from the log",
            )));
        }
        if st.closed {
            return Poll::Ready(Ok(()));
        }
        st.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// Write half of a [`LocalAttachment`]: bytes go to the console bound to
/// the machine (dropped with a warning when none is).
pub struct LocalWriter {
    inner: Arc<Inner>,
    machine: Arc<Machine>,
    rw: bool,
    _guard: Arc<AttachGuard>,
}

impl AsyncWrite for LocalWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.inner.is_shut_down() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the console multiplexer is shut down",
            )));
        }
        if !self.rw {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "read-only console attachment",
            )));
        }
        self.inner.send_to_machine(&self.machine, buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl Salad {
    pub(crate) fn inner_shutdown_rx(&self) -> watch::Receiver<bool> {
        self.inner.shutdown_rx()
    }
}
