//! # vivian-boots
//!
//! Vivian's network boot servers: the DHCP server that points DUT firmware
//! at iPXE and at the `boot.ipxe` script, the read-only TFTP server that
//! serves the iPXE binaries, and systemd socket activation by name.
//!
//! The executor starts both servers with [`Boots::start`]; the decisions
//! that do not need a socket (what a DUT boots, the iPXE script) are in
//! [`vivian_core::netboot`]. Events of every DHCP exchange and TFTP transfer
//! of a known DUT, and netboot requests of unknown MACs, go to the
//! [`BootEventSink`] given at start.
//!
//! Invariants:
//! - No packet, however malformed, makes a server panic or allocate more
//!   than a fixed amount; it is dropped with a debug log.
//! - The DHCP server never hands out its own address, the network or
//!   broadcast address, or another DUT's static address.
//! - The TFTP server never serves a file outside its root and never writes.

#![warn(missing_docs)]

pub mod activation;
pub mod dhcp;
pub mod iface;
pub mod tftp;
pub mod uboot;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tracing::info;
use vivian_core::netboot::{ArtifactFetcher, BootEventSink, DutLookup, Netboot};

pub use activation::{listeners_named, udp_sockets_named, ActivationError};
pub use dhcp::{DhcpConfig, DhcpEngine, DhcpServer, LeaseTable, Subnet};
pub use iface::NetworkSource;
pub use tftp::{DynamicFiles, TftpConfig, TftpContent, TftpServer};
pub use uboot::{HttpFetcher, UbootFiles};

/// Errors starting the boot servers.
#[derive(Debug, thiserror::Error)]
pub enum BootsError {
    /// The private interface cannot be used.
    #[error("network interface {interface:?} (PRIVATE_INTERFACE): {reason}")]
    Interface {
        /// Interface name.
        interface: String,
        /// What is wrong.
        reason: String,
    },
    /// A socket could not be set up.
    #[error("cannot set up a socket on {addr}: {reason}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// What failed.
        reason: String,
    },
    /// The TFTP root is unusable.
    #[error("TFTP root {root:?} (BOOTS_TFTP_ROOT): {reason}")]
    TftpRoot {
        /// The configured root.
        root: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Socket activation failed.
    #[error(transparent)]
    Activation(#[from] ActivationError),
}

/// Settings of [`Boots::start`]; the fields mirror the environment
/// variables of the seed.
#[derive(Debug, Clone)]
pub struct BootsConfig {
    /// `PRIVATE_INTERFACE`: the DUTs' network; DHCP takes its address and
    /// netmask from it and binds to it.
    pub private_interface: String,
    /// `BOOTS_TFTP_ROOT`.
    pub tftp_root: PathBuf,
    /// `EXECUTOR_URL`: base of the `boot.ipxe` URL given to iPXE.
    pub executor_url: String,
    /// `BOOTS_DHCP_IPv4_SOCKET_NAME` (default `dhcp_ipv4`).
    pub dhcp_socket_name: String,
    /// `BOOTS_TFTP_IPv4_SOCKET_NAME` (default `tftp_ipv4`).
    pub tftp_socket_name: String,
    /// `BOOTS_DISABLE_SERVERS` non-empty: start nothing.
    pub disable_servers: bool,
    /// Where DHCP binds without socket activation (default 0.0.0.0:67).
    pub dhcp_bind: SocketAddr,
    /// Where TFTP binds without socket activation (default 0.0.0.0:69).
    pub tftp_bind: SocketAddr,
    /// DHCP lease time (default one day).
    pub lease_time: Duration,
}

impl BootsConfig {
    /// Settings with the reference's defaults for everything else.
    pub fn new(
        private_interface: impl Into<String>,
        tftp_root: impl Into<PathBuf>,
        executor_url: impl Into<String>,
    ) -> Self {
        BootsConfig {
            private_interface: private_interface.into(),
            tftp_root: tftp_root.into(),
            executor_url: executor_url.into(),
            dhcp_socket_name: "dhcp_ipv4".into(),
            tftp_socket_name: "tftp_ipv4".into(),
            disable_servers: false,
            dhcp_bind: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 67)),
            tftp_bind: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 69)),
            lease_time: dhcp::DEFAULT_LEASE_TIME,
        }
    }

    /// The settings of the executor's configuration: `PRIVATE_INTERFACE`,
    /// `BOOTS_TFTP_ROOT`, `EXECUTOR_URL`, `BOOTS_DHCP_IPv4_SOCKET_NAME`,
    /// `BOOTS_TFTP_IPv4_SOCKET_NAME`, `BOOTS_DISABLE_SERVERS`.
    pub fn from_config(config: &vivian_core::config::Config) -> Self {
        BootsConfig {
            dhcp_socket_name: config.boots_dhcp_ipv4_socket_name.clone(),
            tftp_socket_name: config.boots_tftp_ipv4_socket_name.clone(),
            disable_servers: config.boots_disable_servers,
            ..BootsConfig::new(
                &config.private_interface,
                &config.boots_tftp_root,
                config.executor_url.as_str(),
            )
        }
    }
}

/// Where a server's socket comes from.
#[derive(Debug)]
pub enum SocketSource {
    /// Socket activation by the configured name, else bind the configured
    /// address (on the private interface).
    Auto,
    /// This socket (tests, embedding).
    Given(std::net::UdpSocket),
    /// Do not run this server.
    Disabled,
}

/// The running boot servers. Dropping it stops them.
pub struct Boots {
    dhcp: Option<(JoinHandle<()>, SocketAddr)>,
    tftp: Option<(JoinHandle<()>, SocketAddr, tftp::TftpStop)>,
    leases: Arc<Mutex<LeaseTable>>,
    uboot: Arc<UbootFiles>,
}

impl Boots {
    /// Starts DHCP and TFTP as the executor does: socket activation by name,
    /// else bound on the private interface; nothing at all when
    /// `disable_servers` is set. Must be called within a tokio runtime.
    pub fn start(
        config: &BootsConfig,
        duts: Arc<dyn DutLookup>,
        events: Arc<dyn BootEventSink>,
    ) -> Result<Boots, BootsError> {
        Boots::start_with(
            config,
            SocketSource::Auto,
            SocketSource::Auto,
            NetworkSource::interface(&config.private_interface),
            duts,
            events,
        )
    }

    /// Starts the servers with explicit sockets and network parameters.
    pub fn start_with(
        config: &BootsConfig,
        dhcp_socket: SocketSource,
        tftp_socket: SocketSource,
        network: NetworkSource,
        duts: Arc<dyn DutLookup>,
        events: Arc<dyn BootEventSink>,
    ) -> Result<Boots, BootsError> {
        let engine = Arc::new(DhcpEngine::new(
            DhcpConfig {
                executor_url: config.executor_url.clone(),
                tftp_root: config.tftp_root.clone(),
                lease_time: config.lease_time,
            },
            duts.clone(),
            events.clone(),
        ));
        let leases = engine.leases();
        let uboot = Arc::new(UbootFiles::new(duts.clone(), config.tftp_root.clone()));
        if config.disable_servers {
            info!("BOOTS_DISABLE_SERVERS is set: no DHCP, no TFTP");
            return Ok(Boots {
                dhcp: None,
                tftp: None,
                leases,
                uboot,
            });
        }
        let device = Some(config.private_interface.as_str()).filter(|d| !d.is_empty());
        let dhcp_sock = match dhcp_socket {
            SocketSource::Disabled => None,
            SocketSource::Given(s) => Some(s),
            SocketSource::Auto => Some(
                match udp_sockets_named(&config.dhcp_socket_name)?
                    .into_iter()
                    .next()
                {
                    Some(s) => {
                        info!(name = %config.dhcp_socket_name, "DHCP socket from systemd");
                        s
                    }
                    None => iface::bind_udp(config.dhcp_bind, device, true)?,
                },
            ),
        };
        let tftp_sock = match tftp_socket {
            SocketSource::Disabled => None,
            SocketSource::Given(s) => Some(s),
            SocketSource::Auto => Some(
                match udp_sockets_named(&config.tftp_socket_name)?
                    .into_iter()
                    .next()
                {
                    Some(s) => {
                        info!(name = %config.tftp_socket_name, "TFTP socket from systemd");
                        s
                    }
                    None => iface::bind_udp(config.tftp_bind, device, false)?,
                },
            ),
        };

        let tokio_sock = |s: std::net::UdpSocket, what: &str| {
            let addr = s
                .local_addr()
                .unwrap_or(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
            let err = |e: std::io::Error| BootsError::Bind {
                addr,
                reason: format!("{what}: {e}"),
            };
            s.set_nonblocking(true).map_err(err)?;
            let t = tokio::net::UdpSocket::from_std(s).map_err(err)?;
            Ok::<_, BootsError>((t, addr))
        };

        let tftp = match tftp_sock {
            None => None,
            Some(s) => {
                let (sock, addr) = tokio_sock(s, "TFTP socket")?;
                let mut tcfg = TftpConfig::new(&config.tftp_root);
                tcfg.device = device.map(String::from);
                let leases2 = leases.clone();
                let duts2 = duts.clone();
                let resolver: tftp::ClientResolver = Arc::new(move |ip: Ipv4Addr| {
                    if let Some(d) = duts2.by_ip(ip) {
                        return Some(d);
                    }
                    let mac = leases2
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .mac_of(ip, Instant::now())?;
                    duts2.by_mac(mac)
                });
                let server = TftpServer::new(tcfg, sock, resolver, events.clone())?
                    .with_dynamic(uboot.clone());
                let stop = server.stopper();
                Some((tokio::spawn(server.run()), addr, stop))
            }
        };
        let dhcp = match dhcp_sock {
            None => None,
            Some(s) => {
                // Activated sockets may lack SO_BROADCAST; replies need it.
                let _ = socket2::SockRef::from(&s).set_broadcast(true);
                let (sock, addr) = tokio_sock(s, "DHCP socket")?;
                let server = DhcpServer::new(engine, sock, network);
                Some((tokio::spawn(server.run()), addr))
            }
        };
        Ok(Boots {
            dhcp,
            tftp,
            leases,
            uboot,
        })
    }

    /// Sets what decides a machine's boot configuration for the U-Boot
    /// boot script served over TFTP (the executor's [`Netboot`], also
    /// behind `boot.ipxe`). Until it is set, U-Boot's names are refused.
    pub fn set_netboot(&self, netboot: Arc<dyn Netboot>) {
        self.uboot.set_netboot(netboot);
    }

    /// Replaces the plain HTTP download of the kernels and initrds that
    /// U-Boot fetches over TFTP (by an artifact cache, for instance).
    pub fn set_artifact_fetcher(&self, fetcher: Arc<dyn ArtifactFetcher>) {
        self.uboot.set_fetcher(fetcher);
    }

    /// The DHCP server's local address, if it runs.
    pub fn dhcp_local_addr(&self) -> Option<SocketAddr> {
        self.dhcp.as_ref().map(|d| d.1)
    }

    /// The TFTP server's local address, if it runs.
    pub fn tftp_local_addr(&self) -> Option<SocketAddr> {
        self.tftp.as_ref().map(|t| t.1)
    }

    /// The dynamic leases.
    pub fn leases(&self) -> Arc<Mutex<LeaseTable>> {
        self.leases.clone()
    }

    /// Stops both servers (running TFTP transfers end within one timeout).
    pub fn shutdown(self) {
        drop(self)
    }
}

impl Drop for Boots {
    fn drop(&mut self) {
        if let Some((h, _)) = self.dhcp.take() {
            h.abort();
        }
        if let Some((h, _, stop)) = self.tftp.take() {
            stop.stop();
            h.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vivian_core::netboot::{discard_events, StaticDuts};

    #[tokio::test]
    async fn disabled_servers_start_nothing() {
        let mut cfg = BootsConfig::new("no-such-interface", "/no/such/root", "http://x");
        cfg.disable_servers = true;
        // Neither the interface nor the root nor port 67 is touched.
        let boots = Boots::start(&cfg, Arc::new(StaticDuts::default()), discard_events()).unwrap();
        assert_eq!(boots.dhcp_local_addr(), None);
        assert_eq!(boots.tftp_local_addr(), None);
        // Enabled, the same settings fail with errors naming what is wrong.
        cfg.disable_servers = false;
        cfg.dhcp_bind = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let err = Boots::start(&cfg, Arc::new(StaticDuts::default()), discard_events())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("SO_BINDTODEVICE no-such-interface"), "{err}");
        cfg.private_interface = String::new();
        cfg.tftp_bind = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let err = Boots::start(&cfg, Arc::new(StaticDuts::default()), discard_events())
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("/no/such/root") && err.contains("BOOTS_TFTP_ROOT"),
            "{err}"
        );
    }
}
