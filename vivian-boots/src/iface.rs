//! The private interface: its IPv4 address and netmask, and sockets bound
//! to it.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use crate::dhcp::Subnet;
use crate::BootsError;

/// Reads the first IPv4 address and netmask of interface `name`.
pub fn interface_subnet(name: &str) -> Result<Subnet, BootsError> {
    let addrs = if_addrs::get_if_addrs().map_err(|e| BootsError::Interface {
        interface: name.to_string(),
        reason: e.to_string(),
    })?;
    addrs
        .into_iter()
        .filter(|i| i.name == name)
        .find_map(|i| match i.addr {
            if_addrs::IfAddr::V4(v4) => Some(Subnet {
                server_ip: v4.ip,
                netmask: v4.netmask,
            }),
            _ => None,
        })
        .ok_or_else(|| BootsError::Interface {
            interface: name.to_string(),
            reason: "no IPv4 address on it (set PRIVATE_INTERFACE to the DUTs' network interface)"
                .into(),
        })
}

/// Where the DHCP server takes its own address and netmask from.
#[derive(Debug, Clone)]
pub enum NetworkSource {
    /// Fixed values (tests, embedding).
    Fixed(Subnet),
    /// Read from the interface, re-read at most once a second so that a
    /// changed address is picked up live.
    Interface {
        /// Interface name.
        name: String,
        /// Last value read and when.
        cached: Option<(Instant, Subnet)>,
    },
}

impl NetworkSource {
    /// Follows interface `name`.
    pub fn interface(name: impl Into<String>) -> Self {
        NetworkSource::Interface {
            name: name.into(),
            cached: None,
        }
    }

    /// The current subnet.
    pub fn current(&mut self) -> Result<Subnet, BootsError> {
        match self {
            NetworkSource::Fixed(s) => Ok(*s),
            NetworkSource::Interface { name, cached } => {
                if let Some((at, s)) = cached {
                    if at.elapsed() < Duration::from_secs(1) {
                        return Ok(*s);
                    }
                }
                let s = interface_subnet(name)?;
                *cached = Some((Instant::now(), s));
                Ok(s)
            }
        }
    }
}

/// Binds a UDP socket on `addr`, with SO_REUSEADDR, optionally SO_BROADCAST
/// and SO_BINDTODEVICE, non-blocking (ready for tokio).
pub fn bind_udp(
    addr: SocketAddr,
    device: Option<&str>,
    broadcast: bool,
) -> Result<UdpSocket, BootsError> {
    let err = |what: &str, e: std::io::Error| BootsError::Bind {
        addr,
        reason: format!("{what}: {e}"),
    };
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
        .map_err(|e| err("socket", e))?;
    s.set_reuse_address(true)
        .map_err(|e| err("SO_REUSEADDR", e))?;
    if broadcast {
        s.set_broadcast(true).map_err(|e| err("SO_BROADCAST", e))?;
    }
    if let Some(dev) = device.filter(|d| !d.is_empty()) {
        s.bind_device(Some(dev.as_bytes()))
            .map_err(|e| err(&format!("SO_BINDTODEVICE {dev}"), e))?;
    }
    s.bind(&addr.into()).map_err(|e| err("bind", e))?;
    s.set_nonblocking(true).map_err(|e| err("O_NONBLOCK", e))?;
    Ok(s.into())
}

/// The address other hosts reach us at when `local` is a wildcard bind.
pub fn unspecified_to(local: Ipv4Addr, fallback: Option<Ipv4Addr>) -> Ipv4Addr {
    if local.is_unspecified() {
        fallback.unwrap_or(local)
    } else {
        local
    }
}
