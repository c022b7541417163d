//! Network boot: what a DUT's firmware reports, what it boots, and the
//! iPXE script that boots it.
//!
//! This module holds the transport-free half of netbooting; the DHCP and
//! TFTP servers live in `vivian-boots` and call into it:
//!
//! - [`ClientArch`]: the DHCP option 93 table (RFC 4578 and IANA's
//!   "Processor Architecture Types"), mapping an id to a CPU architecture,
//!   a firmware type and a boot protocol, plus the names iPXE uses for them.
//! - [`BootEvent`] and [`BootEventSink`]: every DHCP exchange and TFTP
//!   transfer of a known DUT, and every netboot request of an unknown MAC,
//!   reported to whoever records boot timelines and runs discoveries.
//! - [`DutLookup`]: how the boot servers learn which MAC/IP belongs to which
//!   DUT (implemented over MarsDB by the executor).
//! - [`Netboot`]: what a DUT boots (its running job's deployment, else the
//!   `BOOTS_DEFAULT_*` defaults) and [`render_ipxe_script`], the script served
//!   at `/boot/<id>/boot.ipxe`.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::config::{Arch, BootConfig, BootDefaults, Bootloader, MissingBootDefault, Platform};
use crate::marsdb::{Database, MacAddr, MarsDb};

/// A CPU architecture as reported by netboot firmware.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum CpuArch {
    /// 32-bit x86.
    X86,
    /// 64-bit x86.
    X86_64,
    /// 32-bit ARM.
    Arm32,
    /// 64-bit ARM.
    Arm64,
    /// 32-bit RISC-V.
    RiscV32,
    /// 64-bit RISC-V.
    RiscV64,
}

impl CpuArch {
    /// The name iPXE gives this architecture in `${buildarch}` (`i386`,
    /// `x86_64`, `arm32`, `arm64`); `None` for architectures iPXE does not
    /// support.
    pub fn ipxe_buildarch(self) -> Option<&'static str> {
        match self {
            CpuArch::X86 => Some("i386"),
            CpuArch::X86_64 => Some("x86_64"),
            CpuArch::Arm32 => Some("arm32"),
            CpuArch::Arm64 => Some("arm64"),
            CpuArch::RiscV32 | CpuArch::RiscV64 => None,
        }
    }

    /// Lower-case name used in discovery base names (`x86_64`, `arm64`...).
    pub fn name(self) -> &'static str {
        match self {
            CpuArch::X86 => "x86",
            CpuArch::X86_64 => "x86_64",
            CpuArch::Arm32 => "arm32",
            CpuArch::Arm64 => "arm64",
            CpuArch::RiscV32 => "riscv32",
            CpuArch::RiscV64 => "riscv64",
        }
    }

    /// Upper-case name used in the U-Boot TFTP paths (`ARM64`, `X86_64`...).
    pub fn uboot_name(self) -> &'static str {
        match self {
            CpuArch::X86 => "X86",
            CpuArch::X86_64 => "X86_64",
            CpuArch::Arm32 => "ARM32",
            CpuArch::Arm64 => "ARM64",
            CpuArch::RiscV32 => "RISCV32",
            CpuArch::RiscV64 => "RISCV64",
        }
    }

    /// Parses [`CpuArch::uboot_name`] (case-insensitive).
    pub fn from_uboot_name(name: &str) -> Option<CpuArch> {
        use CpuArch::*;
        [X86, X86_64, Arm32, Arm64, RiscV32, RiscV64]
            .into_iter()
            .find(|a| a.uboot_name().eq_ignore_ascii_case(name))
    }

    /// The architecture id of U-Boot's legacy image header (`IH_ARCH_*`):
    /// ARM 2, x86 3, ARM64 22, x86_64 24, RISC-V 26.
    pub fn uboot_image_arch(self) -> u8 {
        match self {
            CpuArch::Arm32 => 2,
            CpuArch::X86 => 3,
            CpuArch::Arm64 => 22,
            CpuArch::X86_64 => 24,
            CpuArch::RiscV32 | CpuArch::RiscV64 => 26,
        }
    }

    /// The architecture of the `BOOTS_DEFAULT_*` lookup (`I386` for 32-bit
    /// x86); `None` for RISC-V, which has no level of its own there.
    pub fn boot_arch(self) -> Option<Arch> {
        match self {
            CpuArch::X86 => Some(Arch::I386),
            CpuArch::X86_64 => Some(Arch::X86_64),
            CpuArch::Arm32 => Some(Arch::Arm32),
            CpuArch::Arm64 => Some(Arch::Arm64),
            CpuArch::RiscV32 | CpuArch::RiscV64 => None,
        }
    }
}

/// The firmware type of a netbooting machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Firmware {
    /// Legacy PC BIOS (PXE).
    Bios,
    /// UEFI.
    Uefi,
    /// Das U-Boot.
    UBoot,
    /// Raspberry Pi boot ROM.
    Rpi,
}

impl Firmware {
    /// The name iPXE gives this platform in `${platform}` (`pcbios`, `efi`);
    /// `None` for firmwares that do not run iPXE.
    pub fn ipxe_platform(self) -> Option<&'static str> {
        match self {
            Firmware::Bios => Some("pcbios"),
            Firmware::Uefi => Some("efi"),
            Firmware::UBoot | Firmware::Rpi => None,
        }
    }

    /// Lower-case name used in discovery base names.
    pub fn name(self) -> &'static str {
        match self {
            Firmware::Bios => "bios",
            Firmware::Uefi => "uefi",
            Firmware::UBoot => "uboot",
            Firmware::Rpi => "rpi",
        }
    }
}

/// The protocol the firmware wants to download its boot file with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum BootProtocol {
    /// TFTP (classic PXE).
    Tftp,
    /// HTTP (UEFI HTTP boot).
    Http,
}

impl BootProtocol {
    /// Lower-case name used in discovery base names.
    pub fn name(self) -> &'static str {
        match self {
            BootProtocol::Tftp => "tftp",
            BootProtocol::Http => "http",
        }
    }
}

/// What DHCP option 93 (client system architecture) says about a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct ClientArch {
    /// The raw option 93 value.
    pub id: u16,
    /// CPU architecture.
    pub arch: CpuArch,
    /// Firmware type.
    pub firmware: Firmware,
    /// Download protocol of the boot file.
    pub protocol: BootProtocol,
}

impl ClientArch {
    /// Decodes an option 93 value; `None` for ids outside the table.
    pub fn from_id(id: u16) -> Option<ClientArch> {
        use BootProtocol::{Http, Tftp};
        use CpuArch::*;
        use Firmware::*;
        let (arch, firmware, protocol) = match id {
            0x00 => (X86, Bios, Tftp),
            0x06 => (X86, Uefi, Tftp),
            0x07 | 0x09 => (X86_64, Uefi, Tftp),
            0x0a => (Arm32, Uefi, Tftp),
            0x0b => (Arm64, Uefi, Tftp),
            0x0f => (X86, Uefi, Http),
            0x10 => (X86_64, Uefi, Http),
            0x12 => (Arm32, Uefi, Http),
            0x13 => (Arm64, Uefi, Http),
            0x14 => (X86, Bios, Http),
            0x15 => (Arm32, UBoot, Tftp),
            0x16 => (Arm64, UBoot, Tftp),
            0x17 => (Arm32, UBoot, Http),
            0x18 => (Arm64, UBoot, Http),
            0x19 => (RiscV32, Uefi, Tftp),
            0x1a => (RiscV32, Uefi, Http),
            0x1b => (RiscV64, Uefi, Tftp),
            0x1c => (RiscV64, Uefi, Http),
            0x29 => (Arm64, Rpi, Tftp),
            _ => return None,
        };
        Some(ClientArch {
            id,
            arch,
            firmware,
            protocol,
        })
    }

    /// The discovery base name, `<arch>-<firmware>-<protocol>`, e.g.
    /// `x86_64-uefi-tftp` or `x86-bios-tftp`.
    pub fn base_name(&self) -> String {
        format!(
            "{}-{}-{}",
            self.arch.name(),
            self.firmware.name(),
            self.protocol.name()
        )
    }
}

/// A DUT known to the farm database, as the boot servers need to see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownDut {
    /// The DUT's id in MarsDB.
    pub id: String,
    /// Its MAC address.
    pub mac: MacAddr,
    /// Its static IPv4 address, when MarsDB has one.
    pub ip: Option<Ipv4Addr>,
}

/// How the boot servers learn which MAC and which IP belong to which DUT.
///
/// The executor implements it over MarsDB; [`StaticDuts`] is the in-memory
/// implementation. Lookups must be cheap: the DHCP server calls them for
/// every packet.
pub trait DutLookup: Send + Sync {
    /// The DUT whose MAC address is `mac`, if any.
    fn by_mac(&self, mac: MacAddr) -> Option<KnownDut>;
    /// The DUT whose static IP address is `ip`, if any.
    fn by_ip(&self, ip: Ipv4Addr) -> Option<KnownDut>;
}

/// An in-memory [`DutLookup`] over a fixed list.
#[derive(Debug, Clone, Default)]
pub struct StaticDuts(pub Vec<KnownDut>);

impl DutLookup for StaticDuts {
    fn by_mac(&self, mac: MacAddr) -> Option<KnownDut> {
        self.0.iter().find(|d| d.mac == mac).cloned()
    }

    fn by_ip(&self, ip: Ipv4Addr) -> Option<KnownDut> {
        self.0.iter().find(|d| d.ip == Some(ip)).cloned()
    }
}

/// DHCP message types that appear in boot events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum DhcpMessage {
    /// DHCPDISCOVER answered by an OFFER.
    Discover,
    /// DHCPREQUEST answered by an ACK or a NAK.
    Request,
}

/// What a boot server was asked and what it gave, for a DUT's boot timeline.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum BootEventKind {
    /// One DHCP exchange.
    Dhcp {
        /// The client's message.
        message: DhcpMessage,
        /// What option 93 said, if present and known.
        client_arch: Option<ClientArch>,
        /// The vendor class (option 60), if any.
        vendor_class: Option<String>,
        /// True when the client is iPXE (user class `iPXE`).
        ipxe: bool,
        /// The address the client asked for (option 50 or ciaddr), if any.
        requested_ip: Option<Ipv4Addr>,
        /// The address offered or acknowledged; `None` for a NAK.
        given_ip: Option<Ipv4Addr>,
        /// The boot file given (option 67), if any.
        bootfile: Option<String>,
    },
    /// One TFTP read request, whatever its outcome.
    Tftp {
        /// The file name the client asked for.
        filename: String,
        /// The client's address and port.
        client: SocketAddr,
        /// Bytes sent when the transfer completed; `None` if it did not.
        bytes_sent: Option<u64>,
        /// Why the request was refused or the transfer failed, if it was.
        error: Option<String>,
    },
    /// A netboot DHCP request from a MAC that no DUT owns: the discovery
    /// logic uses it to create the DUT when a discovery is running.
    UnknownNetbootRequest {
        /// `<arch>-<firmware>-<protocol>`, e.g. `x86_64-uefi-tftp`.
        base_name: String,
        /// The address given to the machine.
        ip_address: Option<Ipv4Addr>,
    },
}

/// One entry of a DUT's boot timeline, or an unknown machine's netboot.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BootEvent {
    /// When the server answered.
    pub time: DateTime<Utc>,
    /// The client's MAC address.
    pub mac: MacAddr,
    /// The DUT owning the MAC (or the TFTP client's IP), if known.
    pub dut_id: Option<String>,
    /// What happened.
    #[serde(flatten)]
    pub kind: BootEventKind,
}

/// Receives [`BootEvent`]s. Must not block: servers call it inline.
///
/// Implemented for closures and for tokio unbounded channels.
pub trait BootEventSink: Send + Sync {
    /// Records one event.
    fn record(&self, event: BootEvent);
}

impl<F: Fn(BootEvent) + Send + Sync> BootEventSink for F {
    fn record(&self, event: BootEvent) {
        self(event)
    }
}

impl BootEventSink for tokio::sync::mpsc::UnboundedSender<BootEvent> {
    fn record(&self, event: BootEvent) {
        // A closed receiver means nobody records timelines any more.
        let _ = self.send(event);
    }
}

/// A sink that drops every event.
pub fn discard_events() -> Arc<dyn BootEventSink> {
    Arc::new(|_event: BootEvent| {})
}

/// Reports netboot requests of unknown machines to the discovery logic
/// (IN B.3 step 1, F.3): while a discovery runs (a PDU port switched ON to
/// find the machine behind it), the first unknown MAC that netboots is
/// registered as a DUT with `base_name` `<arch>-<firmware>-<protocol>`,
/// the address it was given and no tags, which consumes the discovery.
/// Outside a discovery nothing is created. Every event is then passed to
/// `next`. The registration runs on a task of the current tokio runtime
/// (captured here), so the sink never blocks the boot servers.
pub fn discovery_sink(
    farm: Arc<crate::farm::Farm>,
    next: Arc<dyn BootEventSink>,
) -> Arc<dyn BootEventSink> {
    let rt = tokio::runtime::Handle::current();
    Arc::new(move |event: BootEvent| {
        if let BootEventKind::UnknownNetbootRequest {
            base_name,
            ip_address: Some(ip),
        } = &event.kind
        {
            if farm.discovery().is_some() {
                let reg = crate::farm::DutRegistration {
                    id: Some(event.mac),
                    mac_address: Some(event.mac),
                    base_name: Some(base_name.clone()),
                    ip_address: Some(*ip),
                    tags: Some(Vec::new()),
                    ..Default::default()
                };
                let farm = farm.clone();
                let mac = event.mac;
                rt.spawn(async move {
                    match farm.register_dut(reg).await {
                        Ok((_, true)) => {
                            tracing::info!(%mac, "discovery: registered the netbooting machine")
                        }
                        Ok((_, false)) => {}
                        Err(e) => {
                            tracing::warn!(%mac, "discovery: cannot register the netbooting machine: {e}")
                        }
                    }
                });
            }
        }
        next.record(event);
    })
}

/// A [`DutLookup`] over MarsDB: every DUT's MAC and static address, indexed
/// once per database version (lookups are hash-map reads).
pub struct MarsDbDuts {
    db: Arc<dyn MarsDb>,
    index: std::sync::Mutex<DutIndex>,
}

#[derive(Default)]
struct DutIndex {
    version: Option<Arc<Database>>,
    by_mac: std::collections::HashMap<MacAddr, KnownDut>,
    by_ip: std::collections::HashMap<Ipv4Addr, KnownDut>,
}

impl MarsDbDuts {
    /// Looks DUTs up in `db`'s current snapshot.
    pub fn new(db: Arc<dyn MarsDb>) -> Self {
        MarsDbDuts {
            db,
            index: std::sync::Mutex::new(DutIndex::default()),
        }
    }

    fn with_index<T>(&self, f: impl FnOnce(&DutIndex) -> T) -> T {
        let snap = self.db.snapshot();
        let mut idx = self.index.lock().unwrap_or_else(|e| e.into_inner());
        if !idx.version.as_ref().is_some_and(|v| Arc::ptr_eq(v, &snap)) {
            let mut by_mac = std::collections::HashMap::new();
            let mut by_ip = std::collections::HashMap::new();
            for (id, dut) in &snap.duts {
                let known = KnownDut {
                    id: id.to_string(),
                    mac: dut.mac_address,
                    ip: Some(dut.ip_address).filter(|ip| !ip.is_unspecified()),
                };
                if let Some(ip) = known.ip {
                    by_ip.insert(ip, known.clone());
                }
                by_mac.insert(dut.mac_address, known);
            }
            *idx = DutIndex {
                version: Some(snap),
                by_mac,
                by_ip,
            };
        }
        f(&idx)
    }
}

impl DutLookup for MarsDbDuts {
    fn by_mac(&self, mac: MacAddr) -> Option<KnownDut> {
        self.with_index(|i| i.by_mac.get(&mac).cloned())
    }

    fn by_ip(&self, ip: Ipv4Addr) -> Option<KnownDut> {
        self.with_index(|i| i.by_ip.get(&ip).cloned())
    }
}

/// What the firmware (or the `boot.ipxe` URL's query) says about the
/// machine asking for its boot configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootRequest {
    /// The bootloader asking (`ipxe` for `boot.ipxe`).
    pub bootloader: Bootloader,
    /// `buildarch`, when known.
    pub arch: Option<Arch>,
    /// `platform`, when known.
    pub platform: Option<Platform>,
}

impl BootRequest {
    /// An iPXE request from the `boot.ipxe?platform=&buildarch=` query
    /// values. Missing, empty or unknown values are `None`: the defaults
    /// lookup then skips the candidates that need them (IN B.6).
    pub fn ipxe(platform: Option<&str>, buildarch: Option<&str>) -> Self {
        BootRequest {
            bootloader: Bootloader::Ipxe,
            arch: buildarch.and_then(|a| a.parse().ok()),
            platform: platform.and_then(|p| p.parse().ok()),
        }
    }

    /// A U-Boot request (the boot script of IN B.7): bootloader `uboot`,
    /// platform `uboot`, the CPU architecture of DHCP option 93.
    pub fn uboot(arch: CpuArch) -> Self {
        BootRequest {
            bootloader: Bootloader::Uboot,
            arch: arch.boot_arch(),
            platform: Some(Platform::Uboot),
        }
    }
}

/// A job's deployment: what it asked its DUT to boot. Missing kernel and
/// initrd are taken from the defaults; a missing command line is empty.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Deployment {
    /// Kernel URL.
    pub kernel: Option<String>,
    /// Initramfs URL.
    pub initrd: Option<String>,
    /// Kernel command line.
    pub cmdline: Option<String>,
}

/// Supplies the deployment of the job running on a DUT (implemented by the
/// job engine).
#[async_trait]
pub trait DeploymentProvider: Send + Sync {
    /// The deployment of the job running on DUT `dut_id`, if a job runs
    /// there and has one.
    async fn deployment(&self, dut_id: &str, request: &BootRequest) -> Option<Deployment>;
}

/// A [`DeploymentProvider`] with no running job: every DUT boots the defaults.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoDeployments;

#[async_trait]
impl DeploymentProvider for NoDeployments {
    async fn deployment(&self, _dut_id: &str, _request: &BootRequest) -> Option<Deployment> {
        None
    }
}

/// An in-memory [`DeploymentProvider`]: a map from DUT id to deployment.
#[derive(Debug, Default)]
pub struct MemoryDeployments(pub std::sync::Mutex<std::collections::HashMap<String, Deployment>>);

impl MemoryDeployments {
    /// Sets (or with `None` clears) the deployment of `dut_id`.
    pub fn set(&self, dut_id: &str, deployment: Option<Deployment>) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match deployment {
            Some(d) => m.insert(dut_id.to_string(), d),
            None => m.remove(dut_id),
        };
    }
}

#[async_trait]
impl DeploymentProvider for MemoryDeployments {
    async fn deployment(&self, dut_id: &str, _request: &BootRequest) -> Option<Deployment> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(dut_id)
            .cloned()
    }
}

/// Why no boot configuration could be produced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetbootError {
    /// A needed `BOOTS_DEFAULT_*` value is not set (the REST API answers 400).
    #[error(transparent)]
    MissingDefault(#[from] MissingBootDefault),
}

/// Decides what a machine boots and renders it for its bootloader.
///
/// Invariant: the boot configuration of a DUT running a job with a
/// deployment is that deployment (kernel and initrd filled in from the
/// defaults when the job leaves them out, the command line never
/// defaulted); any other machine, known or not, gets the `BOOTS_DEFAULT_*`
/// defaults for its bootloader, architecture and platform.
#[async_trait]
pub trait Netboot: Send + Sync {
    /// The boot configuration of DUT `dut_id` (`None`: an unknown machine).
    async fn boot_config(
        &self,
        dut_id: Option<&str>,
        request: &BootRequest,
    ) -> Result<BootConfig, NetbootError>;

    /// The iPXE script of `/boot/<id>/boot.ipxe` (IN B.5).
    async fn ipxe_script(
        &self,
        dut_id: Option<&str>,
        request: &BootRequest,
    ) -> Result<String, NetbootError> {
        let config = self.boot_config(dut_id, request).await?;
        Ok(render_ipxe_script(&config, request.platform))
    }

    /// The U-Boot script image served over TFTP at
    /// `/dyn/bootloader/u-boot/<ARCH>/<machine_id>/boot.scr` (IN B.7):
    /// [`render_uboot_script`] wrapped by [`uboot_script_image`].
    async fn uboot_script(
        &self,
        dut_id: Option<&str>,
        machine_id: &str,
        arch: CpuArch,
    ) -> Result<Vec<u8>, NetbootError> {
        let config = self.boot_config(dut_id, &BootRequest::uboot(arch)).await?;
        let script = render_uboot_script(&config, arch, machine_id);
        let now = u32::try_from(Utc::now().timestamp()).unwrap_or(0);
        Ok(uboot_script_image(&script, arch, now))
    }
}

/// The [`Netboot`] of the executor: job deployments first, then the
/// `BOOTS_DEFAULT_*` lookup of the configuration.
pub struct DefaultNetboot {
    defaults: BootDefaults,
    deployments: Arc<dyn DeploymentProvider>,
}

impl DefaultNetboot {
    /// Uses `defaults` (from `Config::boots_defaults`) and the job engine's
    /// `deployments`.
    pub fn new(defaults: BootDefaults, deployments: Arc<dyn DeploymentProvider>) -> Self {
        DefaultNetboot {
            defaults,
            deployments,
        }
    }
}

#[async_trait]
impl Netboot for DefaultNetboot {
    async fn boot_config(
        &self,
        dut_id: Option<&str>,
        request: &BootRequest,
    ) -> Result<BootConfig, NetbootError> {
        use crate::config::BootItem;
        let lookup = |item| {
            self.defaults
                .lookup(item, request.bootloader, request.arch, request.platform)
                .map(str::to_string)
        };
        let deployment = match dut_id {
            Some(id) => self.deployments.deployment(id, request).await,
            None => None,
        };
        Ok(match deployment {
            Some(d) => BootConfig {
                kernel: match d.kernel {
                    Some(k) => k,
                    None => lookup(BootItem::Kernel)?,
                },
                initrd: match d.initrd {
                    Some(i) => i,
                    None => lookup(BootItem::Initrd)?,
                },
                cmdline: d.cmdline.unwrap_or_default(),
            },
            None => BootConfig {
                kernel: lookup(BootItem::Kernel)?,
                initrd: lookup(BootItem::Initrd)?,
                cmdline: lookup(BootItem::Cmdline)?,
            },
        })
    }
}

/// Escapes text for an iPXE command line: `;`, `&` and `|` become
/// `${semicolon:string}`, `${ampersand:string}` and `${pipe:string}`
/// (variables the script defines), and line breaks become spaces so a
/// value can never start a new script line.
pub fn escape_ipxe(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            ';' => out.push_str("${semicolon:string}"),
            '&' => out.push_str("${ampersand:string}"),
            '|' => out.push_str("${pipe:string}"),
            '\n' | '\r' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// Renders the iPXE script of IN B.5 for `config`. The platform only
/// matters for UEFI, where the kernel gets `initrd=initrd` (the EFI stub
/// finds the initrd by name).
pub fn render_ipxe_script(config: &BootConfig, platform: Option<Platform>) -> String {
    let platform_args = if platform == Some(Platform::Efi) {
        "initrd=initrd"
    } else {
        ""
    };
    format!(
        "#!ipxe\n\
         \n\
         set semicolon:hex 3b\n\
         set ampersand:hex 26\n\
         set pipe:hex 7C\n\
         \n\
         echo\n\
         \n\
         echo Downloading the kernel\n\
         kernel {kernel} {platform_args} {cmdline}\n\
         \n\
         echo Downloading the initrd\n\
         initrd --name initrd {initrd}\n\
         \n\
         echo Booting!\n\
         boot\n",
        kernel = escape_ipxe(&config.kernel),
        initrd = escape_ipxe(&config.initrd),
        cmdline = escape_ipxe(&config.cmdline),
    )
}

/// Where U-Boot's dynamic TFTP names start (IN B.7).
pub const UBOOT_TFTP_PREFIX: &str = "/dyn/bootloader/u-boot/";

/// One of the files a U-Boot DUT fetches over TFTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UbootFile {
    /// `boot.scr`: the boot script image (the DHCP boot file).
    Script,
    /// `kernel`: the boot configuration's kernel.
    Kernel,
    /// `initrd`: the boot configuration's initramfs.
    Initrd,
}

impl UbootFile {
    /// The last component of the TFTP name.
    pub fn file_name(self) -> &'static str {
        match self {
            UbootFile::Script => "boot.scr",
            UbootFile::Kernel => "kernel",
            UbootFile::Initrd => "initrd",
        }
    }
}

/// A dynamic U-Boot TFTP name,
/// `/dyn/bootloader/u-boot/<ARCH>/<machine_id>/{boot.scr,kernel,initrd}`.
///
/// The DHCP server gives U-Boot the `boot.scr` name; the script then
/// fetches `kernel` and `initrd` next to it, which the TFTP server resolves
/// to the URLs of the machine's boot configuration at that moment. So a
/// DUT can only ever fetch what it is configured to boot.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UbootPath {
    /// The architecture (from DHCP option 93).
    pub arch: CpuArch,
    /// The machine id (the MAC address the DHCP server saw).
    pub machine_id: String,
    /// Which file.
    pub file: UbootFile,
}

impl UbootPath {
    /// Parses a TFTP name (leading `/` optional). `None` when the name is
    /// not one of ours, or the architecture or machine id is invalid.
    pub fn parse(name: &str) -> Option<UbootPath> {
        let rest = name
            .strip_prefix(UBOOT_TFTP_PREFIX)
            .or_else(|| name.strip_prefix(&UBOOT_TFTP_PREFIX[1..]))?;
        let mut parts = rest.split('/');
        let (arch, id, file) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || id.is_empty() || id == "." || id == ".." {
            return None;
        }
        let file = [UbootFile::Script, UbootFile::Kernel, UbootFile::Initrd]
            .into_iter()
            .find(|f| f.file_name() == file)?;
        Some(UbootPath {
            arch: CpuArch::from_uboot_name(arch)?,
            machine_id: id.to_string(),
            file,
        })
    }

    /// The TFTP name.
    pub fn tftp_name(&self) -> String {
        format!(
            "{UBOOT_TFTP_PREFIX}{}/{}/{}",
            self.arch.uboot_name(),
            self.machine_id,
            self.file.file_name()
        )
    }
}

/// Quotes `text` as one word of U-Boot's hush shell: single quotes (no
/// variable expansion inside), a `'` written as `'\''`, line breaks as
/// spaces.
pub fn quote_uboot(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('\'');
    for c in text.chars() {
        match c {
            '\'' => out.push_str("'\\''"),
            '\n' | '\r' => out.push(' '),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// Renders the U-Boot boot script (hush commands) of IN B.7 for `config`.
///
/// U-Boot fetches the kernel and the initrd over TFTP by the names of
/// [`UbootPath`] (the TFTP server maps them to `config`'s URLs). The device
/// tree is `${fdtfile}` from the TFTP root when the board names one and it
/// downloads, else the one U-Boot runs with (`${fdtcontroladdr}`). The
/// kernel is booted with `booti` (arm64 `Image`, compressed ones through
/// `kernel_comp_addr_r`/`kernel_comp_size`, defaulted here when unset),
/// then `bootz` (arm32 `zImage`) if that returns.
pub fn render_uboot_script(config: &BootConfig, arch: CpuArch, machine_id: &str) -> String {
    let name = |file| {
        quote_uboot(
            &UbootPath {
                arch,
                machine_id: machine_id.to_string(),
                file,
            }
            .tftp_name(),
        )
    };
    // The platform arguments of IN B.5 are empty for U-Boot.
    format!(
        "echo 'Vivian: booting {id}'\n\
         setenv bootargs {bootargs}\n\
         echo Downloading the kernel\n\
         tftp ${{kernel_addr_r}} {kernel}\n\
         setenv vivian_kernel_size ${{filesize}}\n\
         setenv fdt_addr ${{fdtcontroladdr}}\n\
         if test -n \"${{fdtfile}}\" && test -n \"${{fdt_addr_r}}\"; then \
         if tftp ${{fdt_addr_r}} ${{fdtfile}}; then setenv fdt_addr ${{fdt_addr_r}}; fi; fi\n\
         echo Downloading the initrd\n\
         tftp ${{ramdisk_addr_r}} {initrd}\n\
         setenv ramdisk_size ${{filesize}}\n\
         if test -z \"${{kernel_comp_size}}\"; then setenv kernel_comp_size ${{vivian_kernel_size}}; fi\n\
         if test -z \"${{kernel_comp_addr_r}}\"; then \
         setexpr kernel_comp_addr_r ${{ramdisk_addr_r}} + ${{ramdisk_size}}; \
         setexpr kernel_comp_addr_r ${{kernel_comp_addr_r}} + 0x1000000; fi\n\
         echo Booting!\n\
         booti ${{kernel_addr_r}} ${{ramdisk_addr_r}}:${{ramdisk_size}} ${{fdt_addr}}\n\
         bootz ${{kernel_addr_r}} ${{ramdisk_addr_r}}:${{ramdisk_size}} ${{fdt_addr}}\n",
        id = machine_id.replace(['\'', '\n', '\r'], ""),
        bootargs = quote_uboot(&config.cmdline),
        kernel = name(UbootFile::Kernel),
        initrd = name(UbootFile::Initrd),
    )
}

/// Magic number of U-Boot's legacy image header.
pub const UBOOT_IMAGE_MAGIC: u32 = 0x2705_1956;

/// Wraps a script in U-Boot's legacy image format, as `mkimage -T script`
/// does: a 64-byte big-endian header (magic, header CRC-32, `time`, data
/// size, load 0, entry 0, data CRC-32, OS 5 = Linux, the architecture's
/// `IH_ARCH`, type 6 = script, no compression, a 32-byte name), then the
/// data: the script's length (u32), a 0 terminator, the script.
pub fn uboot_script_image(script: &str, arch: CpuArch, time: u32) -> Vec<u8> {
    let mut data = Vec::with_capacity(script.len() + 8);
    data.extend_from_slice(&(script.len() as u32).to_be_bytes());
    data.extend_from_slice(&0u32.to_be_bytes());
    data.extend_from_slice(script.as_bytes());
    let mut image = Vec::with_capacity(64 + data.len());
    image.extend_from_slice(&UBOOT_IMAGE_MAGIC.to_be_bytes());
    image.extend_from_slice(&0u32.to_be_bytes()); // header CRC, below
    image.extend_from_slice(&time.to_be_bytes());
    image.extend_from_slice(&(data.len() as u32).to_be_bytes());
    image.extend_from_slice(&0u32.to_be_bytes()); // load address
    image.extend_from_slice(&0u32.to_be_bytes()); // entry point
    image.extend_from_slice(&crc32(&data).to_be_bytes());
    image.extend_from_slice(&[5, arch.uboot_image_arch(), 6, 0]);
    let mut name = [0u8; 32];
    let label = b"Vivian boot script";
    name[..label.len()].copy_from_slice(label);
    image.extend_from_slice(&name);
    let hcrc = crc32(&image);
    image[4..8].copy_from_slice(&hcrc.to_be_bytes());
    image.extend_from_slice(&data);
    image
}

/// CRC-32 (IEEE 802.3, reflected, as zlib and U-Boot compute it). Boot
/// scripts are a few hundred bytes: the bitwise form is fast enough.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

/// Why an artifact could not be fetched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot fetch {url}: {reason}")]
pub struct ArtifactError {
    /// The artifact's URL.
    pub url: String,
    /// What went wrong.
    pub reason: String,
}

/// Fetches boot artifacts (kernels, initrds) for bootloaders that cannot
/// download URLs themselves: the TFTP server serves U-Boot's `kernel` and
/// `initrd` names from what this returns. `vivian-boots` has a plain HTTP
/// implementation; an artifact cache can provide its own.
#[async_trait]
pub trait ArtifactFetcher: Send + Sync {
    /// An open, readable file holding the whole artifact at `url`.
    async fn fetch(&self, url: &str) -> Result<std::fs::File, ArtifactError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_93_table() {
        let cases = [
            (0x00, "x86-bios-tftp", Some("i386"), Some("pcbios")),
            (0x06, "x86-uefi-tftp", Some("i386"), Some("efi")),
            (0x07, "x86_64-uefi-tftp", Some("x86_64"), Some("efi")),
            (0x09, "x86_64-uefi-tftp", Some("x86_64"), Some("efi")),
            (0x0a, "arm32-uefi-tftp", Some("arm32"), Some("efi")),
            (0x0b, "arm64-uefi-tftp", Some("arm64"), Some("efi")),
            (0x0f, "x86-uefi-http", Some("i386"), Some("efi")),
            (0x10, "x86_64-uefi-http", Some("x86_64"), Some("efi")),
            (0x12, "arm32-uefi-http", Some("arm32"), Some("efi")),
            (0x13, "arm64-uefi-http", Some("arm64"), Some("efi")),
            (0x14, "x86-bios-http", Some("i386"), Some("pcbios")),
            (0x15, "arm32-uboot-tftp", Some("arm32"), None),
            (0x16, "arm64-uboot-tftp", Some("arm64"), None),
            (0x17, "arm32-uboot-http", Some("arm32"), None),
            (0x18, "arm64-uboot-http", Some("arm64"), None),
            (0x19, "riscv32-uefi-tftp", None, Some("efi")),
            (0x1a, "riscv32-uefi-http", None, Some("efi")),
            (0x1b, "riscv64-uefi-tftp", None, Some("efi")),
            (0x1c, "riscv64-uefi-http", None, Some("efi")),
            (0x29, "arm64-rpi-tftp", Some("arm64"), None),
        ];
        for (id, base, buildarch, platform) in cases {
            let a = ClientArch::from_id(id).unwrap();
            assert_eq!(a.base_name(), base, "id {id:#x}");
            assert_eq!(a.arch.ipxe_buildarch(), buildarch, "id {id:#x}");
            assert_eq!(a.firmware.ipxe_platform(), platform, "id {id:#x}");
        }
        for unknown in [0x01, 0x02, 0x08, 0x0c, 0x11, 0x1d, 0x28, 0x2a, 0xffff] {
            assert_eq!(ClientArch::from_id(unknown), None, "id {unknown:#x}");
        }
    }

    fn defaults() -> BootDefaults {
        BootDefaults::from_vars([
            ("BOOTS_DEFAULT_KERNEL", "/kernel"),
            ("BOOTS_DEFAULT_INITRD", "/initrd"),
            ("BOOTS_DEFAULT_CMDLINE", "cmdline"),
            ("BOOTS_DEFAULT_IPXE_X86_64_EFI_KERNEL", "/k-efi"),
            ("BOOTS_DEFAULT_ARM64_INITRD", "/i-arm64"),
        ])
    }

    #[test]
    fn script_format_and_escaping() {
        let cfg = BootConfig {
            kernel: "/kernel".into(),
            initrd: "/initrd".into(),
            cmdline: "platform_args cmdline".into(),
        };
        let s = render_ipxe_script(&cfg, Some(Platform::Pcbios));
        assert_eq!(
            s,
            "#!ipxe\n\nset semicolon:hex 3b\nset ampersand:hex 26\nset pipe:hex 7C\n\necho\n\n\
             echo Downloading the kernel\nkernel /kernel  platform_args cmdline\n\n\
             echo Downloading the initrd\ninitrd --name initrd /initrd\n\necho Booting!\nboot\n"
        );
        let efi = render_ipxe_script(&cfg, Some(Platform::Efi));
        assert!(efi.contains("kernel /kernel initrd=initrd platform_args cmdline\n"));
        let cfg = BootConfig {
            kernel: "http://h/k?a=1&b=2".into(),
            initrd: "/i".into(),
            cmdline: "a;b c&&d e|f\ninitrd evil".into(),
        };
        let s = render_ipxe_script(&cfg, None);
        assert!(s.contains(
            "kernel http://h/k?a=1${ampersand:string}b=2  a${semicolon:string}b \
             c${ampersand:string}${ampersand:string}d e${pipe:string}f initrd evil\n"
        ));
        assert_eq!(s.lines().filter(|l| l.starts_with("initrd")).count(), 1);
        assert_eq!(escape_ipxe(""), "");
    }

    #[tokio::test]
    async fn deployment_then_defaults() {
        let deployments = Arc::new(MemoryDeployments::default());
        let nb = DefaultNetboot::new(defaults(), deployments.clone());
        let efi = BootRequest::ipxe(Some("efi"), Some("x86_64"));
        // Unknown machine and idle DUT: the defaults, most specific first.
        for id in [None, Some("dut1")] {
            let c = nb.boot_config(id, &efi).await.unwrap();
            assert_eq!(
                (c.kernel.as_str(), c.initrd.as_str()),
                ("/k-efi", "/initrd")
            );
            assert_eq!(c.cmdline, "cmdline");
        }
        let arm = BootRequest::ipxe(Some("pcbios"), Some("arm64"));
        assert_eq!(nb.boot_config(None, &arm).await.unwrap().initrd, "/i-arm64");
        // Unknown query values skip the candidates needing them.
        let odd = BootRequest::ipxe(Some("weird"), Some(""));
        assert_eq!((odd.arch, odd.platform), (None, None));
        assert_eq!(nb.boot_config(None, &odd).await.unwrap().kernel, "/kernel");
        // A running job's deployment wins; its missing parts come from the
        // defaults except the command line.
        deployments.set(
            "dut1",
            Some(Deployment {
                kernel: Some("http://job/k".into()),
                initrd: None,
                cmdline: None,
            }),
        );
        let c = nb.boot_config(Some("dut1"), &efi).await.unwrap();
        assert_eq!(c.kernel, "http://job/k");
        assert_eq!(c.initrd, "/initrd");
        assert_eq!(c.cmdline, "");
        let script = nb.ipxe_script(Some("dut1"), &efi).await.unwrap();
        assert!(script.contains("kernel http://job/k initrd=initrd \n"));
        // Missing defaults are an error naming the variables.
        let empty = DefaultNetboot::new(
            BootDefaults::from_vars([("BOOTS_DEFAULT_KERNEL", "/k")]),
            Arc::new(NoDeployments),
        );
        let err = empty.boot_config(None, &efi).await.unwrap_err().to_string();
        assert!(
            err.contains("initramfs") && err.contains("BOOTS_DEFAULT_INITRD"),
            "{err}"
        );
    }

    #[test]
    fn marsdb_lookup_follows_the_database() {
        use crate::marsdb::{Dut, MarsDbExt, MemoryMarsDb};
        let mac: MacAddr = "52:54:00:11:22:33".parse().unwrap();
        let db = Arc::new(MemoryMarsDb::new(Database::new()));
        let lookup = MarsDbDuts::new(db.clone());
        assert_eq!(lookup.by_mac(mac), None);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(db.update(move |d: &mut Database| {
            d.duts.insert(
                mac,
                Dut::new(mac, "virtio", Ipv4Addr::new(10, 42, 0, 10), vec![]),
            );
            Ok::<_, std::convert::Infallible>(())
        }))
        .unwrap();
        let known = lookup.by_mac(mac).unwrap();
        assert_eq!(known.id, "52:54:00:11:22:33");
        assert_eq!(known.ip, Some(Ipv4Addr::new(10, 42, 0, 10)));
        assert_eq!(lookup.by_ip(Ipv4Addr::new(10, 42, 0, 10)).unwrap().mac, mac);
        assert_eq!(lookup.by_ip(Ipv4Addr::new(10, 42, 0, 11)), None);
    }

    #[test]
    fn sinks_receive_events() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let sink: Arc<dyn BootEventSink> = Arc::new(tx);
        let ev = BootEvent {
            time: Utc::now(),
            mac: MacAddr([1, 2, 3, 4, 5, 6]),
            dut_id: None,
            kind: BootEventKind::UnknownNetbootRequest {
                base_name: "x86-bios-tftp".into(),
                ip_address: None,
            },
        };
        sink.record(ev.clone());
        assert_eq!(rx.try_recv().unwrap(), ev);
        let json = serde_json::to_value(&ev).unwrap();
        assert_eq!(json["type"], "unknown_netboot_request");
        assert_eq!(json["mac"], "01:02:03:04:05:06");
    }

    #[test]
    fn uboot_paths_round_trip_and_refuse_others() {
        let p = UbootPath {
            arch: CpuArch::Arm64,
            machine_id: "52:54:00:11:22:33".into(),
            file: UbootFile::Script,
        };
        let name = p.tftp_name();
        assert_eq!(
            name,
            "/dyn/bootloader/u-boot/ARM64/52:54:00:11:22:33/boot.scr"
        );
        assert_eq!(UbootPath::parse(&name), Some(p.clone()));
        assert_eq!(UbootPath::parse(&name[1..]), Some(p));
        let k = UbootPath::parse("/dyn/bootloader/u-boot/arm32/dut/kernel").unwrap();
        assert_eq!((k.arch, k.file), (CpuArch::Arm32, UbootFile::Kernel));
        for bad in [
            "/dyn/bootloader/u-boot/ARM64/x/boot.scr/extra",
            "/dyn/bootloader/u-boot/ARM64/../boot.scr",
            "/dyn/bootloader/u-boot/ARM64//boot.scr",
            "/dyn/bootloader/u-boot/MIPS/x/boot.scr",
            "/dyn/bootloader/u-boot/ARM64/x/dtb",
            "/boot.scr",
        ] {
            assert_eq!(UbootPath::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn uboot_script_and_image_format() {
        let cfg = BootConfig {
            kernel: "http://h/k".into(),
            initrd: "http://h/i".into(),
            cmdline: "b2c.container=\"-ti docker://x\" a;b it's ${x}".into(),
        };
        let s = render_uboot_script(&cfg, CpuArch::Arm64, "52:54:00:11:22:33");
        assert!(
            s.contains("setenv bootargs 'b2c.container=\"-ti docker://x\" a;b it'\\''s ${x}'\n"),
            "{s}"
        );
        assert!(s.contains(
            "tftp ${kernel_addr_r} '/dyn/bootloader/u-boot/ARM64/52:54:00:11:22:33/kernel'\n"
        ));
        assert!(s.contains(
            "tftp ${ramdisk_addr_r} '/dyn/bootloader/u-boot/ARM64/52:54:00:11:22:33/initrd'\n"
        ));
        assert!(s.contains("setenv ramdisk_size ${filesize}\n"));
        assert!(
            s.contains("booti ${kernel_addr_r} ${ramdisk_addr_r}:${ramdisk_size} ${fdt_addr}\n")
        );
        // The kernel URL never reaches the script: only the TFTP name does.
        assert!(!s.contains("http://h/k"));

        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        let img = uboot_script_image(&s, CpuArch::Arm64, 0x6000_0000);
        let be = |o: usize| u32::from_be_bytes(img[o..o + 4].try_into().unwrap());
        assert_eq!(be(0), UBOOT_IMAGE_MAGIC);
        assert_eq!(be(8), 0x6000_0000);
        assert_eq!(be(12) as usize, img.len() - 64);
        assert_eq!((be(16), be(20)), (0, 0));
        assert_eq!(be(24), crc32(&img[64..]));
        assert_eq!(&img[28..32], &[5, 22, 6, 0]);
        let mut header = img[..64].to_vec();
        header[4..8].fill(0);
        assert_eq!(be(4), crc32(&header));
        assert_eq!(be(64) as usize, s.len());
        assert_eq!(be(68), 0);
        assert_eq!(&img[72..], s.as_bytes());
    }

    #[tokio::test]
    async fn uboot_requests_use_the_uboot_defaults() {
        // IN B.6 vector, for U-Boot on ARM64 (platform `uboot`).
        let nb = DefaultNetboot::new(
            BootDefaults::from_vars([
                ("BOOTS_DEFAULT_KERNEL", "/kernel"),
                ("BOOTS_DEFAULT_INITRD", "/initrd"),
                ("BOOTS_DEFAULT_CMDLINE", "cmdline"),
                ("BOOTS_DEFAULT_IPXE_ARM64_KERNEL", "/ipxe-arm64"),
                ("BOOTS_DEFAULT_UBOOT_ARM64_UBOOT_INITRD", "/i-uboot"),
                ("BOOTS_DEFAULT_ARM64_CMDLINE", "arm64"),
            ]),
            Arc::new(NoDeployments),
        );
        let req = BootRequest::uboot(CpuArch::Arm64);
        assert_eq!(
            (req.bootloader, req.arch, req.platform),
            (Bootloader::Uboot, Some(Arch::Arm64), Some(Platform::Uboot))
        );
        let c = nb.boot_config(None, &req).await.unwrap();
        assert_eq!(
            (c.kernel.as_str(), c.initrd.as_str(), c.cmdline.as_str()),
            ("/kernel", "/i-uboot", "arm64")
        );
        let img = nb.uboot_script(None, "m", CpuArch::Arm64).await.unwrap();
        let text = String::from_utf8_lossy(&img[72..]);
        assert!(text.contains("setenv bootargs 'arm64'\n"), "{text}");
        assert!(text.contains("'/dyn/bootloader/u-boot/ARM64/m/initrd'"));
    }

    #[tokio::test]
    async fn unknown_netbooting_machines_are_registered_during_a_discovery_only() {
        use crate::farm::{Farm, FarmOptions, PortPatch};
        use crate::marsdb::{MemoryMarsDb, Pdu, PduConfig};
        use crate::pdu::dummy::DummyDriver;
        use crate::pdu::{DriverRegistry, PduDriver, PduManager, PduOptions, PortState};
        use std::time::Duration;

        let mut db = Database::new();
        let mut config = PduConfig::new();
        config.insert("ports".into(), serde_json::json!(["a", "b"]));
        db.pdus.insert("P".into(), Pdu::new("fast", config));
        let mdb = Arc::new(MemoryMarsDb::new(db));
        let mut reg = DriverRegistry::new();
        reg.register("fast", |config| {
            Ok(Box::new(
                DummyDriver::from_config(config)?
                    .with_default_min_off_time(Duration::from_millis(10)),
            ) as Box<dyn PduDriver>)
        });
        let pdus = Arc::new(PduManager::new(Arc::new(reg), PduOptions::default()));
        let farm = Farm::new(mdb.clone(), pdus, FarmOptions::new("farm"));
        farm.start().await;
        farm.pdus().get("P").unwrap().refresh().await.unwrap();

        let seen = Arc::new(std::sync::Mutex::new(0));
        let seen2 = seen.clone();
        let sink = discovery_sink(
            farm.clone(),
            Arc::new(move |_e: BootEvent| {
                *seen2.lock().unwrap() += 1;
            }),
        );
        let netboot = |mac: MacAddr, ip: Option<Ipv4Addr>| BootEvent {
            time: Utc::now(),
            mac,
            dut_id: None,
            kind: BootEventKind::UnknownNetbootRequest {
                base_name: "arm64-uboot-tftp".into(),
                ip_address: ip,
            },
        };
        let m1 = MacAddr([2, 0, 0, 0, 0, 1]);
        let m2 = MacAddr([2, 0, 0, 0, 0, 2]);
        // No discovery: nothing is created.
        sink.record(netboot(m1, Some(Ipv4Addr::new(10, 0, 0, 5))));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(mdb.snapshot().duts.is_empty());

        farm.patch_port(
            "P",
            "1",
            PortPatch {
                state: Some(PortState::Off),
                reserved: None,
            },
        )
        .await
        .unwrap();
        farm.start_discovery("P", "1", None).await.unwrap();
        sink.record(netboot(m2, Some(Ipv4Addr::new(10, 0, 0, 6))));
        for _ in 0..200 {
            if mdb.snapshot().duts.contains_key(&m2) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let snap = mdb.snapshot();
        let dut = snap
            .duts
            .get(&m2)
            .expect("the netbooting machine was registered");
        assert_eq!(dut.base_name, "arm64-uboot-tftp");
        assert_eq!(dut.ip_address, Ipv4Addr::new(10, 0, 0, 6));
        assert_eq!(dut.pdu.as_deref(), Some("P"));
        assert!(farm.discovery().is_none(), "the discovery was consumed");
        assert_eq!(
            *seen.lock().unwrap(),
            2,
            "every event reaches the next sink"
        );
        farm.shutdown().await;
    }
}
