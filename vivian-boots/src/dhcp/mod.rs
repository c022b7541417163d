//! The DHCP server (IN B.3).
//!
//! [`DhcpEngine`] holds the decisions (addresses, boot files, events) and
//! no socket, so it is unit-tested directly; [`DhcpServer`] runs it on a UDP
//! socket.
//!
//! Addresses: a MAC that a MarsDB DUT owns gets that DUT's static address;
//! any other client gets a dynamic lease from the interface's subnet (its
//! earlier lease if still valid, else the address it asks for if free, else
//! the lowest free one), never the network, broadcast or server address, an
//! address ending in `.0`, or any DUT's static address. Leases live in
//! memory.

pub mod packet;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use dhcproto::v4::MessageType;
use tokio::net::UdpSocket;
use tracing::{debug, info, warn};
use vivian_core::netboot::{
    BootEvent, BootEventKind, BootEventSink, BootProtocol, ClientArch, CpuArch, DhcpMessage,
    DutLookup, Firmware, UbootFile, UbootPath,
};

use crate::iface::NetworkSource;
pub use packet::{parse_request, DhcpRequest, ParseError, Reply};
use vivian_core::marsdb::MacAddr;

/// Default lease time, as the reference: one day.
pub const DEFAULT_LEASE_TIME: Duration = Duration::from_secs(86400);

/// Static settings of the DHCP server.
#[derive(Debug, Clone)]
pub struct DhcpConfig {
    /// Base of the boot script URL given to iPXE (`EXECUTOR_URL`), e.g.
    /// `http://ci-gateway`; a trailing `/` is ignored.
    pub executor_url: String,
    /// The TFTP root, where the iPXE binaries for PXE ROMs are looked up.
    pub tftp_root: PathBuf,
    /// Lease time.
    pub lease_time: Duration,
}

/// One dynamic lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Lease {
    ip: Ipv4Addr,
    expires: Instant,
}

/// The in-memory dynamic leases, shared with the TFTP server (which needs to
/// know which MAC an IP address belongs to).
#[derive(Debug, Default)]
pub struct LeaseTable {
    by_mac: HashMap<MacAddr, Lease>,
    by_ip: HashMap<Ipv4Addr, MacAddr>,
    /// Lowest address that may be free (allocation scans from here first).
    hint: u32,
}

impl LeaseTable {
    /// The MAC holding an unexpired lease on `ip`.
    pub fn mac_of(&self, ip: Ipv4Addr, now: Instant) -> Option<MacAddr> {
        let mac = *self.by_ip.get(&ip)?;
        let lease = self.by_mac.get(&mac)?;
        (lease.expires > now).then_some(mac)
    }

    /// The unexpired lease of `mac`.
    pub fn ip_of(&self, mac: MacAddr, now: Instant) -> Option<Ipv4Addr> {
        self.by_mac
            .get(&mac)
            .filter(|l| l.expires > now)
            .map(|l| l.ip)
    }

    /// Number of leases held (expired ones included until reused).
    pub fn len(&self) -> usize {
        self.by_mac.len()
    }

    /// True when no lease is held.
    pub fn is_empty(&self) -> bool {
        self.by_mac.is_empty()
    }

    fn insert(&mut self, mac: MacAddr, ip: Ipv4Addr, expires: Instant) {
        if let Some(old) = self.by_mac.insert(mac, Lease { ip, expires }) {
            if old.ip != ip && self.by_ip.get(&old.ip) == Some(&mac) {
                self.by_ip.remove(&old.ip);
                self.hint = self.hint.min(u32::from(old.ip));
            }
        }
        if let Some(prev) = self.by_ip.insert(ip, mac) {
            if prev != mac {
                self.by_mac.remove(&prev);
            }
        }
    }

    fn release(&mut self, mac: MacAddr) {
        if let Some(l) = self.by_mac.remove(&mac) {
            if self.by_ip.get(&l.ip) == Some(&mac) {
                self.by_ip.remove(&l.ip);
            }
            self.hint = self.hint.min(u32::from(l.ip));
        }
    }

    /// True if `ip` is held by another MAC's unexpired lease.
    fn taken_by_other(&self, ip: Ipv4Addr, mac: MacAddr, now: Instant) -> bool {
        matches!(self.mac_of(ip, now), Some(m) if m != mac)
    }
}

/// The subnet the server hands addresses out of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    /// The server's own address.
    pub server_ip: Ipv4Addr,
    /// The netmask.
    pub netmask: Ipv4Addr,
}

impl Subnet {
    fn network(&self) -> u32 {
        u32::from(self.server_ip) & u32::from(self.netmask)
    }

    fn broadcast(&self) -> u32 {
        self.network() | !u32::from(self.netmask)
    }

    /// True if `ip` may be given to a client: inside the subnet, not the
    /// network, broadcast or server address, not ending in `.0`.
    pub fn is_assignable(&self, ip: Ipv4Addr) -> bool {
        let v = u32::from(ip);
        v & u32::from(self.netmask) == self.network()
            && v != self.network()
            && v != self.broadcast()
            && ip != self.server_ip
            && v & 0xff != 0
    }
}

/// What the engine decided for one packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The encoded reply.
    pub bytes: Vec<u8>,
    /// Where to send it.
    pub to: SocketAddrV4,
    /// The decoded reply, for logs and tests.
    pub reply: Reply,
}

/// The DHCP decisions, without a socket.
pub struct DhcpEngine {
    config: DhcpConfig,
    duts: Arc<dyn DutLookup>,
    events: Arc<dyn BootEventSink>,
    leases: Arc<Mutex<LeaseTable>>,
}

impl DhcpEngine {
    /// A new engine with an empty lease table.
    pub fn new(
        config: DhcpConfig,
        duts: Arc<dyn DutLookup>,
        events: Arc<dyn BootEventSink>,
    ) -> DhcpEngine {
        DhcpEngine {
            config,
            duts,
            events,
            leases: Arc::new(Mutex::new(LeaseTable::default())),
        }
    }

    /// The lease table, to share with the TFTP server.
    pub fn leases(&self) -> Arc<Mutex<LeaseTable>> {
        self.leases.clone()
    }

    /// Handles one parsed request; `None` means no reply (message types we
    /// ignore, a REQUEST for another server, no free address).
    pub fn handle(&self, req: &DhcpRequest, net: Subnet, now: Instant) -> Option<Answer> {
        let kind = match req.message_type {
            MessageType::Discover => DhcpMessage::Discover,
            MessageType::Request => DhcpMessage::Request,
            MessageType::Release => {
                if req.server_id.is_none_or(|s| s == net.server_ip) {
                    self.lock().release(req.mac);
                }
                debug!(mac = %req.mac, "DHCPRELEASE: lease freed");
                return None;
            }
            other => {
                debug!(mac = %req.mac, message = ?other, "ignoring DHCP message type");
                return None;
            }
        };
        if kind == DhcpMessage::Request && req.server_id.is_some_and(|s| s != net.server_ip) {
            debug!(mac = %req.mac, "DHCPREQUEST for another server: ignored");
            return None;
        }
        let dut = self.duts.by_mac(req.mac);
        let static_ip = dut.as_ref().and_then(|d| d.ip);
        let requested = req
            .requested_ip
            .or((req.ciaddr != Ipv4Addr::UNSPECIFIED).then_some(req.ciaddr));

        let given = {
            let mut leases = self.lock();
            match kind {
                DhcpMessage::Discover => {
                    self.choose(&mut leases, req.mac, static_ip, requested, net, now)
                }
                DhcpMessage::Request => match requested {
                    None => self.choose(&mut leases, req.mac, static_ip, None, net, now),
                    Some(ip) if static_ip == Some(ip) => Some(ip),
                    Some(_) if static_ip.is_some() => None,
                    Some(ip) if self.can_lease(&leases, req.mac, ip, net, now) => Some(ip),
                    Some(_) => None,
                },
            }
            .inspect(|ip| {
                if static_ip != Some(*ip) {
                    leases.insert(req.mac, *ip, now + self.config.lease_time);
                }
            })
        };

        let arch = req.client_arch.and_then(ClientArch::from_id);
        let netboot = self.is_netboot(req);
        let bootfile = match (given, netboot) {
            (Some(_), true) => self.bootfile(req, arch),
            _ => None,
        };

        let message_type = match (kind, given) {
            (DhcpMessage::Discover, None) => {
                warn!(mac = %req.mac, "no free address left in {}/{}", net.server_ip, net.netmask);
                return None;
            }
            (DhcpMessage::Discover, Some(_)) => MessageType::Offer,
            (DhcpMessage::Request, Some(_)) => MessageType::Ack,
            (DhcpMessage::Request, None) => MessageType::Nak,
        };
        let reply = Reply {
            message_type,
            yiaddr: given.unwrap_or(Ipv4Addr::UNSPECIFIED),
            server_ip: net.server_ip,
            netmask: net.netmask,
            lease_secs: u32::try_from(self.config.lease_time.as_secs()).unwrap_or(u32::MAX),
            ipxe_no_proxydhcp: bootfile.is_some() && req.is_ipxe(),
            bootfile,
        };
        let bytes = packet::encode_reply(req, &reply);
        let to = if req.giaddr != Ipv4Addr::UNSPECIFIED {
            SocketAddrV4::new(req.giaddr, 67)
        } else if message_type != MessageType::Nak && req.ciaddr != Ipv4Addr::UNSPECIFIED {
            SocketAddrV4::new(req.ciaddr, 68)
        } else {
            SocketAddrV4::new(Ipv4Addr::BROADCAST, 68)
        };

        debug!(mac = %req.mac, ?message_type, ip = ?given, bootfile = ?reply.bootfile, "DHCP reply");
        match &dut {
            Some(d) => self.events.record(BootEvent {
                time: Utc::now(),
                mac: req.mac,
                dut_id: Some(d.id.clone()),
                kind: BootEventKind::Dhcp {
                    message: kind,
                    client_arch: arch,
                    vendor_class: req.vendor_class_str(),
                    ipxe: req.is_ipxe(),
                    requested_ip: requested,
                    given_ip: given,
                    bootfile: reply.bootfile.clone(),
                },
            }),
            None if netboot => {
                if let Some(a) = arch {
                    self.events.record(BootEvent {
                        time: Utc::now(),
                        mac: req.mac,
                        dut_id: None,
                        kind: BootEventKind::UnknownNetbootRequest {
                            base_name: a.base_name(),
                            ip_address: given,
                        },
                    });
                }
            }
            None => {}
        }
        Some(Answer { bytes, to, reply })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LeaseTable> {
        // A panic while holding the lock cannot leave the table
        // inconsistent in a way that matters more than losing DHCP.
        self.leases.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_static_elsewhere(&self, ip: Ipv4Addr, mac: MacAddr) -> bool {
        self.duts.by_ip(ip).is_some_and(|d| d.mac != mac)
    }

    fn can_lease(
        &self,
        leases: &LeaseTable,
        mac: MacAddr,
        ip: Ipv4Addr,
        net: Subnet,
        now: Instant,
    ) -> bool {
        net.is_assignable(ip)
            && !leases.taken_by_other(ip, mac, now)
            && !self.is_static_elsewhere(ip, mac)
    }

    fn choose(
        &self,
        leases: &mut LeaseTable,
        mac: MacAddr,
        static_ip: Option<Ipv4Addr>,
        requested: Option<Ipv4Addr>,
        net: Subnet,
        now: Instant,
    ) -> Option<Ipv4Addr> {
        if let Some(ip) = static_ip {
            return Some(ip);
        }
        if let Some(ip) = leases.ip_of(mac, now) {
            if self.can_lease(leases, mac, ip, net, now) {
                return Some(ip);
            }
        }
        if let Some(ip) = requested {
            if self.can_lease(leases, mac, ip, net, now) {
                return Some(ip);
            }
        }
        let first = net.network() + 1;
        let last = net.broadcast().checked_sub(1)?;
        if first > last {
            return None;
        }
        let start = leases.hint.clamp(first, last);
        let candidates = (start..=last).chain(first..start);
        for v in candidates {
            let ip = Ipv4Addr::from(v);
            if self.can_lease(leases, mac, ip, net, now) {
                leases.hint = v;
                return Some(ip);
            }
        }
        None
    }

    /// A netboot request: option 93 present and the client asks for a boot
    /// file, calls itself a PXE client or is U-Boot.
    fn is_netboot(&self, req: &DhcpRequest) -> bool {
        let Some(id) = req.client_arch else {
            return false;
        };
        let vendor = req.vendor_class.as_deref().unwrap_or_default();
        req.parameter_request_list.contains(&67)
            || vendor.starts_with(b"PXEClient")
            || vendor == b"U-Boot"
            || ClientArch::from_id(id)
                .is_some_and(|a| matches!(a.firmware, Firmware::UBoot | Firmware::Rpi))
    }

    /// The boot file of IN B.3: the `boot.ipxe` URL for iPXE, the generated
    /// boot script for U-Boot, else the iPXE binary for the firmware,
    /// looked up in the TFTP root.
    fn bootfile(&self, req: &DhcpRequest, arch: Option<ClientArch>) -> Option<String> {
        let Some(arch) = arch else {
            warn!(mac = %req.mac, id = ?req.client_arch, "Unsupported architecture id in option 93");
            return None;
        };
        let Some(buildarch) = arch.arch.ipxe_buildarch() else {
            warn!(mac = %req.mac, "Unsupported architecture '{:?}'", arch.arch);
            return None;
        };
        if req.is_ipxe() {
            let base = self.config.executor_url.trim_end_matches('/');
            let platform = arch.firmware.ipxe_platform().unwrap_or("");
            return Some(format!(
                "{base}/boot/{}/boot.ipxe?platform={platform}&buildarch={buildarch}",
                req.mac
            ));
        }
        if arch.protocol != BootProtocol::Tftp {
            warn!(mac = %req.mac, "Unsupported protocol 'HTTP'");
            return None;
        }
        let candidates: Vec<String> = match arch.firmware {
            Firmware::Bios if matches!(arch.arch, CpuArch::X86 | CpuArch::X86_64) => {
                vec!["i386-undionly.kpxe".into(), "undionly.kpxe".into()]
            }
            Firmware::Bios => {
                warn!(mac = %req.mac, "Unsupported BIOS architecture '{:?}'", arch.arch);
                return None;
            }
            Firmware::UBoot => {
                return Some(
                    UbootPath {
                        arch: arch.arch,
                        machine_id: req.mac.to_string(),
                        file: UbootFile::Script,
                    }
                    .tftp_name(),
                );
            }
            Firmware::Uefi => {
                let mut c = vec![format!("{buildarch}-snponly.efi")];
                if arch.arch == CpuArch::X86_64 {
                    c.push("snponly.efi".into());
                }
                c
            }
            other => {
                warn!(mac = %req.mac, "Unsupported firmware type '{other:?}'");
                return None;
            }
        };
        let found = candidates
            .iter()
            .find(|c| self.config.tftp_root.join(c).is_file());
        match found {
            Some(f) => Some(f.clone()),
            None => {
                warn!(
                    mac = %req.mac,
                    root = %self.config.tftp_root.display(),
                    "no iPXE binary for this firmware in the TFTP root (looked for {}); \
                     see vivian-boots/README.md, \"iPXE binaries\"",
                    candidates.join(", ")
                );
                Some(candidates[0].clone())
            }
        }
    }
}

/// A running DHCP server.
pub struct DhcpServer {
    engine: Arc<DhcpEngine>,
    socket: UdpSocket,
    network: NetworkSource,
}

impl DhcpServer {
    /// A server answering on `socket` (already bound, broadcast enabled)
    /// with the addresses of `network`.
    pub fn new(engine: Arc<DhcpEngine>, socket: UdpSocket, network: NetworkSource) -> Self {
        DhcpServer {
            engine,
            socket,
            network,
        }
    }

    /// Serves until the task is dropped or aborted. The socket loop runs
    /// on a thread of its own with blocking I/O: a packet costs one wake-up
    /// and two system calls, without a round trip through the runtime's
    /// reactor. The task owns the thread: once dropped, the thread ends
    /// (and closes the socket) within [`STOP_POLL`]. Socket errors on
    /// receive are logged and the loop goes on.
    pub async fn run(self) {
        let DhcpServer {
            engine,
            socket,
            network,
        } = self;
        let local = socket.local_addr().ok();
        let socket = match socket.into_std().and_then(|s| {
            s.set_nonblocking(false)?;
            s.set_read_timeout(Some(STOP_POLL))?;
            Ok(s)
        }) {
            Ok(s) => s,
            Err(e) => {
                warn!(?local, "DHCP server not started: socket setup: {e}");
                return;
            }
        };
        let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
        let flag = stop.0.clone();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let spawned = std::thread::Builder::new()
            .name("dhcp-server".into())
            .spawn(move || {
                serve_blocking(&engine, &socket, network, &flag);
                drop(done_tx);
            });
        match spawned {
            Ok(_) => {
                info!(?local, "DHCP server started");
                let _ = done_rx.await;
            }
            Err(e) => warn!(?local, "DHCP server not started: {e}"),
        }
    }
}

/// How often the DHCP thread checks whether its task was dropped.
pub const STOP_POLL: Duration = Duration::from_millis(100);

/// Sets the flag when dropped (the task running [`DhcpServer::run`] was).
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The DHCP socket loop, blocking, until `stop` is set.
fn serve_blocking(
    engine: &DhcpEngine,
    socket: &std::net::UdpSocket,
    mut network: NetworkSource,
    stop: &AtomicBool,
) {
    let mut buf = vec![0u8; 1500];
    while !stop.load(Ordering::Relaxed) {
        let (n, from) = match socket.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => {
                warn!("DHCP receive error: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let req = match parse_request(&buf[..n]) {
            Ok(r) => r,
            Err(e) => {
                debug!(%from, "dropping malformed DHCP packet: {e}");
                continue;
            }
        };
        let net = match network.current() {
            Ok(n) => n,
            Err(e) => {
                warn!("cannot answer DHCP: {e}");
                continue;
            }
        };
        if let Some(answer) = engine.handle(&req, net, Instant::now()) {
            if let Err(e) = socket.send_to(&answer.bytes, SocketAddr::V4(answer.to)) {
                warn!(to = %answer.to, "DHCP send error: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests;
