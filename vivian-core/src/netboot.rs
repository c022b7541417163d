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

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::Serialize;

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

/// A 48-bit Ethernet address, printed as lower-case `aa:bb:cc:dd:ee:ff`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HwAddr(pub [u8; 6]);

impl fmt::Display for HwAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for HwAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for HwAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl std::str::FromStr for HwAddr {
    type Err = String;

    /// Parses `aa:bb:cc:dd:ee:ff` or `aa-bb-cc-dd-ee-ff` (any case).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split([':', '-']).collect();
        if parts.len() != 6 {
            return Err(format!("invalid MAC address {s:?}: expected 6 bytes"));
        }
        let mut out = [0u8; 6];
        for (o, p) in out.iter_mut().zip(parts) {
            if p.len() != 2 {
                return Err(format!("invalid MAC address {s:?}: bad byte {p:?}"));
            }
            *o = u8::from_str_radix(p, 16)
                .map_err(|_| format!("invalid MAC address {s:?}: bad byte {p:?}"))?;
        }
        Ok(HwAddr(out))
    }
}

/// A DUT known to the farm database, as the boot servers need to see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownDut {
    /// The DUT's id in MarsDB.
    pub id: String,
    /// Its MAC address.
    pub mac: HwAddr,
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
    fn by_mac(&self, mac: HwAddr) -> Option<KnownDut>;
    /// The DUT whose static IP address is `ip`, if any.
    fn by_ip(&self, ip: Ipv4Addr) -> Option<KnownDut>;
}

/// An in-memory [`DutLookup`] over a fixed list.
#[derive(Debug, Clone, Default)]
pub struct StaticDuts(pub Vec<KnownDut>);

impl DutLookup for StaticDuts {
    fn by_mac(&self, mac: HwAddr) -> Option<KnownDut> {
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
    pub mac: HwAddr,
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

    #[test]
    fn hwaddr_round_trip() {
        let m: HwAddr = "52:54:00:AB:cd:0e".parse().unwrap();
        assert_eq!(m.to_string(), "52:54:00:ab:cd:0e");
        assert_eq!("52-54-00-ab-cd-0e".parse::<HwAddr>().unwrap(), m);
        assert!("52:54:00:ab:cd".parse::<HwAddr>().is_err());
        assert!("52:54:00:ab:cd:zz".parse::<HwAddr>().is_err());
        assert!("52:54:00:ab:cd:0e0".parse::<HwAddr>().is_err());
    }

    #[test]
    fn sinks_receive_events() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let sink: Arc<dyn BootEventSink> = Arc::new(tx);
        let ev = BootEvent {
            time: Utc::now(),
            mac: HwAddr([1, 2, 3, 4, 5, 6]),
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
}
