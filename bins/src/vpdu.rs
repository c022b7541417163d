//! The virtual PDU server (`vpdu` binary): the byte protocol of
//! [`vivian_pdu::vpdu`], with a virtual DUT behind each outlet.
//!
//! Outlet `n` (0-based) owns a DUT with MAC `52:54:00:11:22:<n as 2 hex
//! digits>`. Switching the outlet ON calls [`OutletDut::power_on`], OFF
//! calls [`OutletDut::power_off`]. What the DUT is comes from a
//! [`DutFactory`]: [`IdleDut`] (nothing runs; the default), [`CommandDut`]
//! (a process per powered outlet, `--dut-command`), [`RecordingDut`] (a
//! test's event log), or any other implementation (a simulated netbooting
//! machine, a QEMU VM).
//!
//! The server never panics on network input: short reads, garbage words,
//! out-of-range ports get `0x00` or a closed connection; every read has a
//! timeout.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, Notify, Semaphore};
use tracing::{debug, info, warn};
use vivian_pdu::vpdu::{
    decode, CMD_COUNT, CMD_OFF, CMD_ON, CMD_STATUS, REPLY_ERROR, REPLY_OK, STATUS_OFF, STATUS_ON,
    STATUS_UNKNOWN,
};

/// Default TCP port of the server.
pub const DEFAULT_PORT: u16 = 9191;
/// Default number of outlets.
pub const DEFAULT_NUM_PORTS: u8 = 16;
/// How long a client has to send its 4 bytes.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections handled at once (more wait in the listen backlog).
pub const MAX_CONNECTIONS: usize = 256;

/// The MAC address of the DUT behind outlet `index`.
pub fn outlet_mac(index: u16) -> String {
    format!("52:54:00:11:22:{:02x}", index & 0xff)
}

/// What a DUT knows about its outlet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutletInfo {
    /// Outlet index (0-based; the port id).
    pub index: u16,
    /// The DUT's MAC address (`52:54:00:11:22:xx`).
    pub mac: String,
    /// SALAD's console port, for DUTs that connect their serial console.
    pub salad_console_port: Option<u16>,
}

/// A DUT powered by an outlet. The server serialises the calls of one
/// outlet: `power_on` is only called on an outlet that is not ON,
/// `power_off` only on one that is not OFF.
#[async_trait]
pub trait OutletDut: Send + 'static {
    /// The outlet was switched ON: start the machine. An error leaves the
    /// outlet in the UNKNOWN state and the client gets `0x00`.
    async fn power_on(&mut self) -> Result<(), String>;
    /// The outlet was switched OFF: stop the machine at once.
    async fn power_off(&mut self);
}

/// Makes the DUT of each outlet when the server starts.
pub trait DutFactory: Send + Sync + 'static {
    /// The DUT behind `outlet`.
    fn create(&self, outlet: &OutletInfo) -> Box<dyn OutletDut>;
}

impl<F> DutFactory for F
where
    F: Fn(&OutletInfo) -> Box<dyn OutletDut> + Send + Sync + 'static,
{
    fn create(&self, outlet: &OutletInfo) -> Box<dyn OutletDut> {
        self(outlet)
    }
}

/// A DUT that does nothing (the outlet only keeps its state).
#[derive(Debug, Default)]
pub struct IdleDut;

#[async_trait]
impl OutletDut for IdleDut {
    async fn power_on(&mut self) -> Result<(), String> {
        Ok(())
    }
    async fn power_off(&mut self) {}
}

/// Factory of [`IdleDut`]s.
pub fn idle_duts() -> impl DutFactory {
    |_: &OutletInfo| Box::new(IdleDut) as Box<dyn OutletDut>
}

/// A DUT that is a process: `sh -c <command>` runs while the outlet is ON
/// (its process group gets SIGTERM when the outlet is switched OFF, SIGKILL
/// 2 s later), with `VPDU_OUTLET`, `VPDU_MAC` and
/// `VPDU_SALAD_CONSOLE_PORT` (when known) in its environment.
#[derive(Debug)]
pub struct CommandDut {
    command: String,
    outlet: OutletInfo,
    child: Option<tokio::process::Child>,
}

impl CommandDut {
    /// A DUT running `command` for `outlet`.
    pub fn new(command: impl Into<String>, outlet: OutletInfo) -> Self {
        Self {
            command: command.into(),
            outlet,
            child: None,
        }
    }
}

#[async_trait]
impl OutletDut for CommandDut {
    async fn power_on(&mut self) -> Result<(), String> {
        let mut cmd = tokio::process::Command::new("sh");
        cmd.arg("-c")
            .arg(&self.command)
            .env("VPDU_OUTLET", self.outlet.index.to_string())
            .env("VPDU_MAC", &self.outlet.mac)
            .stdin(std::process::Stdio::null())
            // Its own process group, so that power-off stops its children too.
            .process_group(0)
            .kill_on_drop(true);
        if let Some(p) = self.outlet.salad_console_port {
            cmd.env("VPDU_SALAD_CONSOLE_PORT", p.to_string());
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("starting `{}`: {e}", self.command))?;
        debug!(
            outlet = self.outlet.index,
            pid = child.id(),
            "DUT process started"
        );
        self.child = Some(child);
        Ok(())
    }

    /// SIGTERM to the process group, SIGKILL after 2 s.
    async fn power_off(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
            // SAFETY: kill(2) on the process group we created; no memory involved.
            unsafe { libc::kill(-pid, libc::SIGTERM) };
            if tokio::time::timeout(Duration::from_secs(2), child.wait())
                .await
                .is_ok()
            {
                // Stragglers of the group that ignored SIGTERM.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
                return;
            }
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        }
        let _ = child.kill().await;
    }
}

/// Factory of [`CommandDut`]s running `command`.
pub fn command_duts(command: String) -> impl DutFactory {
    move |o: &OutletInfo| {
        Box::new(CommandDut::new(command.clone(), o.clone())) as Box<dyn OutletDut>
    }
}

/// An event seen by a [`RecordingDut`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DutEvent {
    /// Outlet (index) switched ON.
    PoweredOn(u16),
    /// Outlet (index) switched OFF.
    PoweredOff(u16),
}

/// A shared log of DUT events, for tests.
#[derive(Clone, Debug, Default)]
pub struct DutLog {
    events: Arc<StdMutex<Vec<DutEvent>>>,
    fail_power_on: Arc<StdMutex<Vec<u16>>>,
    changed: Arc<Notify>,
}

impl DutLog {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every event so far, in order.
    pub fn events(&self) -> Vec<DutEvent> {
        self.events.lock().unwrap().clone()
    }

    /// Makes the DUT of `outlet` fail to power on.
    pub fn fail_power_on(&self, outlet: u16) {
        self.fail_power_on.lock().unwrap().push(outlet);
    }

    /// Waits (up to `timeout`) until the log has `n` events.
    pub async fn wait_for_len(&self, n: usize, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            if self.events.lock().unwrap().len() >= n {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.events.lock().unwrap().len() >= n;
            }
        }
    }

    fn push(&self, e: DutEvent) {
        self.events.lock().unwrap().push(e);
        self.changed.notify_waiters();
    }

    /// Factory of [`RecordingDut`]s writing to this log.
    pub fn factory(&self) -> impl DutFactory {
        let log = self.clone();
        move |o: &OutletInfo| {
            Box::new(RecordingDut {
                index: o.index,
                log: log.clone(),
            }) as Box<dyn OutletDut>
        }
    }
}

/// A DUT that records its power events in a [`DutLog`].
#[derive(Debug)]
pub struct RecordingDut {
    index: u16,
    log: DutLog,
}

#[async_trait]
impl OutletDut for RecordingDut {
    async fn power_on(&mut self) -> Result<(), String> {
        if self.log.fail_power_on.lock().unwrap().contains(&self.index) {
            return Err(format!("outlet {}: scripted power-on failure", self.index));
        }
        self.log.push(DutEvent::PoweredOn(self.index));
        Ok(())
    }
    async fn power_off(&mut self) {
        self.log.push(DutEvent::PoweredOff(self.index));
    }
}

/// The state of an outlet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutletState {
    /// Powered.
    On,
    /// Not powered (the initial state).
    Off,
    /// The DUT failed to start.
    Unknown,
}

struct Outlet {
    info: OutletInfo,
    inner: Mutex<(OutletState, Box<dyn OutletDut>)>,
}

struct Shared {
    outlets: Vec<Outlet>,
    shutdown: Notify,
}

/// Server settings.
#[derive(Clone, Debug)]
pub struct VpduConfig {
    /// Number of outlets (1–255: the count is answered in one byte).
    pub num_ports: u8,
    /// SALAD's console port, handed to the DUTs.
    pub salad_console_port: Option<u16>,
}

impl Default for VpduConfig {
    fn default() -> Self {
        Self {
            num_ports: DEFAULT_NUM_PORTS,
            salad_console_port: None,
        }
    }
}

/// A bound virtual PDU server.
pub struct VpduServer {
    listener: TcpListener,
    shared: Arc<Shared>,
}

impl VpduServer {
    /// Binds the server on `addr` with a DUT from `factory` per outlet.
    pub async fn bind(
        addr: impl tokio::net::ToSocketAddrs,
        config: VpduConfig,
        factory: impl DutFactory,
    ) -> std::io::Result<Self> {
        if config.num_ports == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the number of ports must be 1 to 255",
            ));
        }
        let listener = TcpListener::bind(addr).await?;
        let outlets = (0..u16::from(config.num_ports))
            .map(|index| {
                let info = OutletInfo {
                    index,
                    mac: outlet_mac(index),
                    salad_console_port: config.salad_console_port,
                };
                let dut = factory.create(&info);
                Outlet {
                    info,
                    inner: Mutex::new((OutletState::Off, dut)),
                }
            })
            .collect();
        Ok(Self {
            listener,
            shared: Arc::new(Shared {
                outlets,
                shutdown: Notify::new(),
            }),
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` completes or a client asks for a shutdown
    /// (bit 13), then switches every outlet OFF.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        tokio::pin!(shutdown);
        loop {
            let permit = tokio::select! {
                _ = &mut shutdown => break,
                _ = self.shared.shutdown.notified() => break,
                p = limit.clone().acquire_owned() => p.expect("semaphore never closed"),
            };
            let (stream, peer) = tokio::select! {
                _ = &mut shutdown => break,
                _ = self.shared.shutdown.notified() => break,
                r = self.listener.accept() => match r {
                    Ok(s) => s,
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let shared = self.shared.clone();
            tokio::spawn(async move {
                handle_connection(&shared, stream, peer).await;
                drop(permit);
            });
        }
        info!("vpdu shutting down: switching every outlet OFF");
        for outlet in &self.shared.outlets {
            let mut inner = outlet.inner.lock().await;
            if inner.0 != OutletState::Off {
                inner.1.power_off().await;
                inner.0 = OutletState::Off;
            }
        }
    }

    /// Serves in a background task; the handle stops it.
    pub fn spawn(self) -> VpduServerHandle {
        let addr = self.local_addr().ok();
        let stop = Arc::new(Notify::new());
        let stop2 = stop.clone();
        let task = tokio::spawn(self.serve(async move { stop2.notified().await }));
        VpduServerHandle { addr, stop, task }
    }

    /// The state of an outlet (for tests and logs).
    pub async fn outlet_state(&self, index: u16) -> Option<OutletState> {
        outlet_state(&self.shared, index).await
    }
}

async fn outlet_state(shared: &Shared, index: u16) -> Option<OutletState> {
    Some(shared.outlets.get(usize::from(index))?.inner.lock().await.0)
}

/// A server running in the background.
pub struct VpduServerHandle {
    addr: Option<SocketAddr>,
    stop: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl VpduServerHandle {
    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr.expect("a bound listener has an address")
    }

    /// Whether the server has stopped (e.g. after a shutdown request).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Stops the server (every outlet OFF) and waits for it.
    pub async fn stop(self) {
        self.stop.notify_one();
        let _ = self.task.await;
    }
}

async fn handle_connection(shared: &Shared, mut stream: TcpStream, peer: SocketAddr) {
    let mut word = [0u8; 4];
    match tokio::time::timeout(READ_TIMEOUT, stream.read_exact(&mut word)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "short request, closing");
            return;
        }
        Err(_) => {
            debug!(%peer, "no request within the timeout, closing");
            return;
        }
    }
    let word = u32::from_be_bytes(word);
    let (reply, shutdown) = answer(shared, word).await;
    debug!(%peer, word = format_args!("{word:#010x}"), reply, "vpdu request");
    let _ = tokio::time::timeout(READ_TIMEOUT, async {
        stream.write_all(&[reply]).await?;
        stream.shutdown().await
    })
    .await;
    if shutdown {
        info!(%peer, "shutdown requested by a client");
        shared.shutdown.notify_one();
    }
}

/// The reply byte to a request word, and whether to shut down.
async fn answer(shared: &Shared, word: u32) -> (u8, bool) {
    let Some(req) = decode(word) else {
        return (REPLY_ERROR, false);
    };
    if req.command == CMD_COUNT {
        return (shared.outlets.len() as u8, req.shutdown);
    }
    let Some(outlet) = shared.outlets.get(req.port as usize) else {
        return (REPLY_ERROR, false);
    };
    let mut inner = outlet.inner.lock().await;
    let reply = match req.command {
        CMD_ON => {
            if inner.0 == OutletState::On {
                REPLY_OK
            } else {
                match inner.1.power_on().await {
                    Ok(()) => {
                        info!(outlet = outlet.info.index, mac = %outlet.info.mac, "outlet ON");
                        inner.0 = OutletState::On;
                        REPLY_OK
                    }
                    Err(e) => {
                        warn!(outlet = outlet.info.index, error = %e, "the DUT failed to power on");
                        inner.0 = OutletState::Unknown;
                        REPLY_ERROR
                    }
                }
            }
        }
        CMD_OFF => {
            if inner.0 != OutletState::Off {
                inner.1.power_off().await;
                inner.0 = OutletState::Off;
                info!(outlet = outlet.info.index, "outlet OFF");
            }
            REPLY_OK
        }
        CMD_STATUS => match inner.0 {
            OutletState::On => STATUS_ON,
            OutletState::Off => STATUS_OFF,
            OutletState::Unknown => STATUS_UNKNOWN,
        },
        _ => REPLY_ERROR,
    };
    (reply, req.shutdown)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_are_two_hex_digits() {
        assert_eq!(outlet_mac(0), "52:54:00:11:22:00");
        assert_eq!(outlet_mac(10), "52:54:00:11:22:0a");
        assert_eq!(outlet_mac(255), "52:54:00:11:22:ff");
    }
}
