//! QEMU virtual machines behind the `vpdu` server's outlets (`vpdu --dut
//! qemu`): a farm of real x86 PCs, minus the PCs.
//!
//! Switching outlet `n` ON starts a VM that looks to the farm like a
//! netbooting PC:
//!
//! - its NIC is a virtio NIC with the outlet's MAC (`52:54:00:11:22:<n>`)
//!   on a tap device that [`QemuDut`] creates and adds to the operator's
//!   bridge ([`QemuConfig::bridge`], the reference's `--bridge`); the tap
//!   disappears with the VM;
//! - it boots from the network first: SeaBIOS runs the NIC's iPXE option
//!   ROM (Debian's `ipxe-qemu`), which asks DHCP and chains to the
//!   `boot.ipxe` script the farm hands out;
//! - its serial port (ttyS0) is connected to SALAD's netconsole over TCP
//!   (the reference's `--salad-console-port`). Like the reference's farm
//!   iPXE, which prints `SALAD.machine_id=` first thing, the connection
//!   starts with `SALAD.machine_id=<mac>`, so that SALAD binds the console
//!   to the machine before the firmware prints anything;
//! - it has a virtio GPU (PCI 1af4:1050), as the reference's virtual DUTs,
//!   whose registration reports base name `virtio`;
//! - it uses KVM when `/dev/kvm` opens and the CPU has VMX or SVM
//!   ([`Accel::detect`]), TCG otherwise.
//!
//! Switching the outlet OFF kills QEMU at once (a power cut). A guest that
//! powers itself off ends QEMU; the outlet stays ON, like a PC that shut
//! down with its outlet still powered. QEMU gets SIGKILL if the server
//! process dies.
//!
//! Timing: the time from power ON to the first console line is logged
//! (`first console line ... after power ON`), and so is QEMU's stderr.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::vpdu::{DutFactory, OutletDut, OutletInfo};

/// Default QEMU binary.
pub const DEFAULT_QEMU: &str = "qemu-system-x86_64";
/// Default bridge (the reference's default).
pub const DEFAULT_BRIDGE: &str = "virbr0";
/// Default guest memory, in MiB (enough for a kernel and a busybox
/// initramfs; the reference gives its VMs 2 GiB).
pub const DEFAULT_MEMORY_MIB: u32 = 256;
/// How long connecting to SALAD's netconsole may take.
pub const CONSOLE_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The accelerator of the VMs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation (`-accel kvm -cpu host`).
    Kvm,
    /// Emulation (`-accel tcg`).
    Tcg,
}

impl Accel {
    /// KVM when `/dev/kvm` opens read-write and the CPU advertises VMX or
    /// SVM (a `/dev/kvm` without either creates VMs that never run),
    /// TCG otherwise.
    pub fn detect() -> Accel {
        let kvm_opens = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        let cpu_has_virt = std::fs::read_to_string("/proc/cpuinfo")
            .map(|c| cpuinfo_has_virtualisation(&c))
            .unwrap_or(false);
        if kvm_opens && cpu_has_virt {
            Accel::Kvm
        } else {
            Accel::Tcg
        }
    }

    /// QEMU's name of the accelerator.
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// Whether a `/proc/cpuinfo` text lists the `vmx` or `svm` flag.
pub fn cpuinfo_has_virtualisation(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

/// Settings shared by every outlet's VM.
#[derive(Clone, Debug)]
pub struct QemuConfig {
    /// The QEMU binary.
    pub qemu: PathBuf,
    /// The bridge the VMs' taps join (the farm's private network).
    pub bridge: String,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Virtual CPUs.
    pub cpus: u8,
    /// Accelerator.
    pub accel: Accel,
    /// SALAD's netconsole (`host:port`); without it the serial output is
    /// read (for the timing log) and dropped.
    pub salad_console: Option<String>,
    /// Extra QEMU arguments, appended.
    pub extra_args: Vec<String>,
}

impl QemuConfig {
    /// Defaults for everything but the bridge; the accelerator is detected.
    pub fn new(bridge: impl Into<String>) -> Self {
        QemuConfig {
            qemu: PathBuf::from(DEFAULT_QEMU),
            bridge: bridge.into(),
            memory_mib: DEFAULT_MEMORY_MIB,
            cpus: 1,
            accel: Accel::detect(),
            salad_console: None,
            extra_args: Vec::new(),
        }
    }

    /// Checks what can be checked before any VM starts: the bridge exists
    /// and is a bridge, `/dev/net/tun` exists, the QEMU binary runs.
    pub fn check(&self) -> Result<(), String> {
        check_bridge(&self.bridge)?;
        if !Path::new("/dev/net/tun").exists() {
            return Err("/dev/net/tun is missing: the VMs' taps need the tun driver".into());
        }
        let out = std::process::Command::new(&self.qemu)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| {
                format!(
                    "cannot run {} ({e}): install Debian's qemu-system-x86 and ipxe-qemu",
                    self.qemu.display()
                )
            })?;
        if !out.status.success() {
            return Err(format!(
                "{} --version failed: {}",
                self.qemu.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(())
    }

    /// QEMU's command-line arguments for `outlet`'s VM, whose NIC is the
    /// tap open as `tap_fd` and whose serial port is the socket `serial_fd`
    /// (both inherited by QEMU).
    pub fn args(&self, outlet: &OutletInfo, tap_fd: RawFd, serial_fd: RawFd) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "-name".into(),
            format!(
                "vpdu-outlet-{},process=vpdu-outlet-{}",
                outlet.index, outlet.index
            ),
            "-accel".into(),
            self.accel.name().into(),
        ];
        if self.accel == Accel::Kvm {
            a.extend(["-cpu".into(), "host".into()]);
        }
        a.extend([
            "-m".into(),
            self.memory_mib.to_string(),
            "-smp".into(),
            self.cpus.to_string(),
            // No default devices, no monitor; -nographic makes SeaBIOS and
            // iPXE print on the serial port.
            "-nodefaults".into(),
            "-nographic".into(),
            "-monitor".into(),
            "none".into(),
            "-chardev".into(),
            format!("socket,id=serial0,fd={serial_fd}"),
            "-serial".into(),
            "chardev:serial0".into(),
            "-netdev".into(),
            format!("tap,id=net0,fd={tap_fd}"),
            "-device".into(),
            format!("virtio-net-pci,netdev=net0,mac={}", outlet.mac),
            "-device".into(),
            "virtio-gpu-pci".into(),
            "-boot".into(),
            "order=n".into(),
        ]);
        a.extend(self.extra_args.iter().cloned());
        a
    }
}

/// The index of interface `name` in the current network namespace (not
/// from sysfs, which shows the namespace that mounted it).
fn interface_index(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: a valid C string.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (index != 0).then_some(index)
}

/// An error unless `bridge` names an existing interface. (Whether it is a
/// bridge shows when a tap is added to it.)
fn check_bridge(bridge: &str) -> Result<(), String> {
    if bridge.is_empty() || bridge.contains('/') || bridge.contains('\0') || bridge.len() >= 16 {
        return Err(format!(
            "{bridge:?} is not a valid interface name (--bridge)"
        ));
    }
    if interface_index(bridge).is_none() {
        return Err(format!(
            "no network interface named {bridge:?} (--bridge): create the bridge first, \
             e.g. `ip link add {bridge} type bridge && ip link set {bridge} up`"
        ));
    }
    Ok(())
}

/// Factory of [`QemuDut`]s sharing `config`.
pub fn qemu_duts(config: QemuConfig) -> impl DutFactory {
    let config = Arc::new(config);
    move |o: &OutletInfo| Box::new(QemuDut::new(config.clone(), o.clone())) as Box<dyn OutletDut>
}

/// The VM behind one outlet.
pub struct QemuDut {
    config: Arc<QemuConfig>,
    outlet: OutletInfo,
    running: Option<Running>,
}

struct Running {
    kill: oneshot::Sender<()>,
    process: JoinHandle<()>,
    console: JoinHandle<()>,
}

impl QemuDut {
    /// A powered-off VM for `outlet`.
    pub fn new(config: Arc<QemuConfig>, outlet: OutletInfo) -> Self {
        QemuDut {
            config,
            outlet,
            running: None,
        }
    }

    async fn start(&mut self) -> Result<Running, String> {
        let started = Instant::now();
        let index = self.outlet.index;
        // The console first: no VM without its serial cable.
        let salad = match &self.config.salad_console {
            Some(addr) => {
                let mut s =
                    match tokio::time::timeout(CONSOLE_CONNECT_TIMEOUT, TcpStream::connect(addr))
                        .await
                    {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            return Err(format!("cannot connect to SALAD's netconsole at {addr}: {e}"))
                        }
                        Err(_) => {
                            return Err(format!(
                                "SALAD's netconsole at {addr} did not accept within {CONSOLE_CONNECT_TIMEOUT:?}"
                            ))
                        }
                    };
                let _ = s.set_nodelay(true);
                s.write_all(format!("SALAD.machine_id={}\n", self.outlet.mac).as_bytes())
                    .await
                    .map_err(|e| format!("writing to SALAD's netconsole at {addr}: {e}"))?;
                Some(s)
            }
            None => None,
        };
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()
            .map_err(|e| format!("cannot create the serial socket pair: {e}"))?;
        let tap = create_tap(&self.config.bridge)?;
        let args = self
            .config
            .args(&self.outlet, tap.fd.as_raw_fd(), theirs.as_raw_fd());
        debug!(outlet = index, tap = %tap.name, ?args, "starting QEMU");

        let mut cmd = tokio::process::Command::new(&self.config.qemu);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let inherit = [tap.fd.as_raw_fd(), theirs.as_raw_fd()];
        // SAFETY: between fork and exec only async-signal-safe calls:
        // fcntl on two descriptors we own, prctl.
        unsafe {
            cmd.pre_exec(move || {
                for fd in inherit {
                    if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                // The VM dies with the server.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.config.qemu.display()))?;
        // QEMU holds its own copies now.
        drop(tap.fd);
        drop(theirs);
        info!(
            outlet = index,
            mac = %self.outlet.mac,
            pid = child.id(),
            tap = %tap.name,
            bridge = %self.config.bridge,
            accel = self.config.accel.name(),
            "QEMU VM started"
        );

        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(l)) = lines.next_line().await {
                    warn!(outlet = index, "qemu: {l}");
                }
            });
        }
        let (kill_tx, kill_rx) = oneshot::channel();
        let process = tokio::spawn(async move {
            tokio::select! {
                status = child.wait() => {
                    info!(outlet = index, ?status, "QEMU exited by itself (the machine powered off or crashed)");
                }
                _ = kill_rx => {
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                    debug!(outlet = index, "QEMU killed");
                }
            }
        });
        ours.set_nonblocking(true)
            .map_err(|e| format!("serial socket: {e}"))?;
        let vm =
            tokio::net::UnixStream::from_std(ours).map_err(|e| format!("serial socket: {e}"))?;
        let console = tokio::spawn(console_proxy(vm, salad, started, index));
        Ok(Running {
            kill: kill_tx,
            process,
            console,
        })
    }
}

#[async_trait]
impl OutletDut for QemuDut {
    async fn power_on(&mut self) -> Result<(), String> {
        if self.running.is_some() {
            return Ok(());
        }
        let r = self.start().await.map_err(|e| {
            warn!(outlet = self.outlet.index, "cannot start the VM: {e}");
            e
        })?;
        self.running = Some(r);
        Ok(())
    }

    async fn power_off(&mut self) {
        let Some(r) = self.running.take() else {
            return;
        };
        let _ = r.kill.send(());
        let _ = r.process.await;
        // QEMU is gone: the proxy sees the end of the serial stream and
        // closes the netconsole connection; do not wait for a stuck peer.
        let abort = r.console.abort_handle();
        if tokio::time::timeout(Duration::from_secs(2), r.console)
            .await
            .is_err()
        {
            abort.abort();
        }
        info!(outlet = self.outlet.index, "QEMU VM powered off");
    }
}

/// Copies the VM's serial port to SALAD and back; logs the time from
/// power ON to the first console line. When SALAD goes away the VM's
/// output is still read (and dropped), so that the guest never blocks on
/// its serial port.
async fn console_proxy(
    vm: tokio::net::UnixStream,
    salad: Option<TcpStream>,
    started: Instant,
    outlet: u16,
) {
    let (mut vm_rd, mut vm_wr) = vm.into_split();
    let (mut salad_rd, mut salad_wr) = match salad {
        Some(s) => {
            let (r, w) = s.into_split();
            (Some(r), Some(w))
        }
        None => (None, None),
    };
    let mut first_byte = false;
    let mut first_line = false;
    let mut from_vm = vec![0u8; 16 * 1024];
    let mut from_salad = vec![0u8; 4 * 1024];
    loop {
        tokio::select! {
            r = vm_rd.read(&mut from_vm) => {
                let n = match r {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let chunk = &from_vm[..n];
                if !first_byte {
                    first_byte = true;
                    debug!(outlet, seconds = started.elapsed().as_secs_f64(), "first console byte");
                }
                if !first_line && chunk.contains(&b'\n') {
                    first_line = true;
                    let s = started.elapsed().as_secs_f64();
                    info!(outlet, seconds = s, "first console line {s:.3} s after power ON");
                }
                if let Some(w) = salad_wr.as_mut() {
                    if let Err(e) = w.write_all(chunk).await {
                        warn!(outlet, "SALAD's netconsole connection failed: {e}; the console output is dropped");
                        salad_wr = None;
                        salad_rd = None;
                    }
                }
            }
            r = async { salad_rd.as_mut().expect("guarded").read(&mut from_salad).await }, if salad_rd.is_some() => {
                match r {
                    Ok(0) | Err(_) => {
                        warn!(outlet, "SALAD closed the netconsole connection; the console output is dropped");
                        salad_rd = None;
                        salad_wr = None;
                    }
                    Ok(n) => {
                        if vm_wr.write_all(&from_salad[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            }
        }
    }
    if let Some(mut w) = salad_wr {
        let _ = w.shutdown().await;
    }
}

/// A tap device, open, up, in a bridge. It disappears when the last
/// descriptor (QEMU's) is closed.
struct Tap {
    fd: OwnedFd,
    name: String,
}

/// `struct ifreq`: a name and a 24-byte union (flags, ifindex, ...).
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    data: [u8; 24],
}

impl IfReq {
    fn named(name: &str) -> IfReq {
        let mut r = IfReq {
            name: [0; 16],
            data: [0; 24],
        };
        let n = name.len().min(15);
        r.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        r
    }

    fn name(&self) -> String {
        let end = self.name.iter().position(|&b| b == 0).unwrap_or(16);
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }

    fn set_short(&mut self, v: i16) {
        self.data[..2].copy_from_slice(&v.to_ne_bytes());
    }

    fn short(&self) -> i16 {
        i16::from_ne_bytes([self.data[0], self.data[1]])
    }

    fn set_int(&mut self, v: i32) {
        self.data[..4].copy_from_slice(&v.to_ne_bytes());
    }
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const SIOCBRADDIF: libc::c_ulong = 0x89a2;

fn ioctl(fd: RawFd, req: libc::c_ulong, ifr: &mut IfReq) -> std::io::Result<()> {
    // SAFETY: `ifr` is a valid, writable `struct ifreq` for the duration of
    // the call, and every request used here reads or writes one.
    let rc = unsafe { libc::ioctl(fd, req as _, ifr as *mut IfReq) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Creates a tap named `vpdu<N>`, adds it to `bridge` and brings it up.
fn create_tap(bridge: &str) -> Result<Tap, String> {
    check_bridge(bridge)?;
    // SAFETY: open(2) of a constant path; the descriptor is owned below.
    let raw = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if raw < 0 {
        return Err(format!(
            "cannot open /dev/net/tun: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut req = IfReq::named("vpdu%d");
    req.set_short(IFF_TAP | IFF_NO_PI);
    ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req)
        .map_err(|e| format!("cannot create a tap device: {e}"))?;
    let name = req.name();

    // SAFETY: socket(2); the descriptor is owned below.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(format!(
            "cannot open a control socket: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: as above.
    let sock = unsafe { OwnedFd::from_raw_fd(sock) };
    let index = interface_index(&name)
        .ok_or_else(|| format!("tap {name}: {}", std::io::Error::last_os_error()))?;
    let mut br = IfReq::named(bridge);
    br.set_int(index as i32);
    ioctl(sock.as_raw_fd(), SIOCBRADDIF, &mut br).map_err(|e| {
        if matches!(
            e.raw_os_error(),
            Some(libc::EOPNOTSUPP) | Some(libc::EINVAL)
        ) {
            format!("{bridge:?} is not a bridge (--bridge): {e}")
        } else {
            format!("cannot add tap {name} to bridge {bridge:?} (--bridge): {e}")
        }
    })?;
    let mut up = IfReq::named(&name);
    ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut up)
        .map_err(|e| format!("tap {name}: {e}"))?;
    up.set_short(up.short() | libc::IFF_UP as i16);
    ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as _, &mut up)
        .map_err(|e| format!("cannot bring tap {name} up: {e}"))?;
    Ok(Tap { fd, name })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outlet(index: u16) -> OutletInfo {
        OutletInfo {
            index,
            mac: crate::vpdu::outlet_mac(index),
            salad_console_port: None,
        }
    }

    #[test]
    fn cpuinfo_flags() {
        assert!(cpuinfo_has_virtualisation(
            "processor\t: 0\nflags\t\t: fpu vme vmx sse\n"
        ));
        assert!(cpuinfo_has_virtualisation("flags\t: fpu svm\n"));
        assert!(!cpuinfo_has_virtualisation(
            "flags\t\t: fpu vme sse hypervisor\nvmx flags\t: ept\n"
        ));
        assert!(!cpuinfo_has_virtualisation(""));
    }

    #[test]
    fn vm_arguments() {
        let mut c = QemuConfig::new("br0");
        c.accel = Accel::Tcg;
        c.extra_args = vec!["-snapshot".into()];
        let a = c.args(&outlet(3), 7, 9).join(" ");
        assert!(
            a.contains("-accel tcg -m 256 -smp 1 -nodefaults -nographic -monitor none"),
            "{a}"
        );
        assert!(!a.contains("-cpu host"), "{a}");
        assert!(
            a.contains("-chardev socket,id=serial0,fd=9 -serial chardev:serial0"),
            "{a}"
        );
        assert!(
            a.contains(
                "-netdev tap,id=net0,fd=7 -device virtio-net-pci,netdev=net0,mac=52:54:00:11:22:03"
            ),
            "{a}"
        );
        assert!(a.contains("-device virtio-gpu-pci -boot order=n"), "{a}");
        assert!(a.ends_with("-snapshot"), "{a}");
        c.accel = Accel::Kvm;
        assert!(c
            .args(&outlet(0), 7, 9)
            .join(" ")
            .contains("-accel kvm -cpu host"));
    }

    #[test]
    fn bridge_checks_name_the_problem() {
        // `lo` exists in every network namespace.
        assert!(check_bridge("lo").is_ok());
        let e = check_bridge("vivian-nope0").unwrap_err();
        assert!(
            e.contains("no network interface named \"vivian-nope0\""),
            "{e}"
        );
        assert!(check_bridge("../x").is_err());
        assert!(check_bridge("").is_err());
        assert!(check_bridge("a-very-long-bridge-name").is_err());
    }

    #[test]
    fn ifreq_layout() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
        let mut r = IfReq::named("vpdu%d");
        r.set_short(IFF_TAP | IFF_NO_PI);
        assert_eq!(r.name(), "vpdu%d");
        assert_eq!(r.short(), 0x1002);
    }
}
