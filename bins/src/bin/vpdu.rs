//! `vpdu`: a virtual PDU speaking the reference's byte protocol, with a
//! virtual DUT (MAC 52:54:00:11:22:<outlet>) behind each outlet.

use anyhow::{bail, Context};
use clap::Parser;
use vivian::vpdu::{
    command_duts, idle_duts, VpduConfig, VpduServer, DEFAULT_NUM_PORTS, DEFAULT_PORT,
};

/// A virtual PDU for Vivian: one TCP connection per 4-byte command.
#[derive(Parser, Debug)]
#[command(name = "vpdu", version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    host: String,
    /// TCP port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = DEFAULT_PORT)]
    port: u16,
    /// Number of outlets (1-255).
    #[arg(long, default_value_t = DEFAULT_NUM_PORTS)]
    num_ports: u8,
    /// SALAD's netconsole port, given to the virtual DUTs (as
    /// VPDU_SALAD_CONSOLE_PORT for --dut-command).
    #[arg(long)]
    salad_console_port: Option<u16>,
    /// Shell command run while an outlet is ON (killed when it goes OFF),
    /// with VPDU_OUTLET and VPDU_MAC in its environment.
    #[arg(long, conflicts_with = "executor_url")]
    dut_command: Option<String>,
    /// Make every outlet's DUT a simulated machine that netboots from this
    /// executor (`http://host:port`): it fetches `boot.ipxe`, its kernel and
    /// initrd, connects its console to SALAD's netconsole and runs the
    /// script of its kernel command line. Without it (and without
    /// --dut-command) the DUTs are idle.
    #[arg(long)]
    executor_url: Option<String>,
    /// Host of SALAD's netconsole for the simulated DUTs and the QEMU VMs.
    #[arg(long, default_value = "127.0.0.1")]
    console_host: String,
    /// `qemu`: every outlet's DUT is a QEMU VM (x86_64, MAC of the outlet,
    /// virtio NIC on a tap in --bridge, network boot first through the
    /// NIC's iPXE ROM, serial port to SALAD's netconsole at
    /// --console-host:--salad-console-port). ON starts it, OFF kills it.
    /// KVM when /dev/kvm works and the CPU has VMX/SVM, TCG otherwise.
    #[arg(long, value_enum, conflicts_with_all = ["dut_command", "executor_url"])]
    dut: Option<DutKind>,
    /// The bridge the QEMU VMs' NICs join (--dut qemu): the farm's private
    /// network, where the executor's DHCP and TFTP servers listen.
    #[arg(long, default_value = vivian::qemu::DEFAULT_BRIDGE)]
    bridge: String,
    /// QEMU binary (--dut qemu).
    #[arg(long, default_value = vivian::qemu::DEFAULT_QEMU)]
    qemu: std::path::PathBuf,
    /// Memory of each QEMU VM, in MiB (--dut qemu).
    #[arg(long, default_value_t = vivian::qemu::DEFAULT_MEMORY_MIB)]
    qemu_memory: u32,
    /// Extra QEMU argument for every VM, repeatable (--dut qemu).
    #[arg(long, allow_hyphen_values = true)]
    qemu_arg: Vec<String>,
    /// The DHCP server the simulated DUTs ask for an address and a boot
    /// file before booting (`255.255.255.255:67` on a real network, the
    /// server's address on loopback). Without it they skip DHCP. Their
    /// DHCP client listens on port 68 (needs root or CAP_NET_BIND_SERVICE).
    #[arg(long, requires = "executor_url")]
    dhcp_server: Option<std::net::SocketAddr>,
    /// The interface the simulated DUTs' DHCP client binds to.
    #[arg(long, requires = "dhcp_server")]
    dhcp_interface: Option<String>,
}

/// What is behind the outlets.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum DutKind {
    /// Nothing: the outlets only keep their state.
    Idle,
    /// A QEMU virtual machine per outlet.
    Qemu,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if args.num_ports == 0 {
        bail!("--num-ports must be 1 to 255");
    }
    let config = VpduConfig {
        num_ports: args.num_ports,
        salad_console_port: args.salad_console_port,
    };
    let addr = (args.host.as_str(), args.port);
    let server = match (args.dut_command, args.executor_url) {
        _ if args.dut == Some(DutKind::Qemu) => {
            let mut qemu = vivian::qemu::QemuConfig::new(args.bridge.clone());
            qemu.qemu = args.qemu.clone();
            qemu.memory_mib = args.qemu_memory;
            qemu.extra_args = args.qemu_arg.clone();
            qemu.salad_console = args
                .salad_console_port
                .map(|p| format!("{}:{p}", args.console_host));
            qemu.check()
                .map_err(|e| anyhow::anyhow!("--dut qemu: {e}"))?;
            if qemu.salad_console.is_none() {
                tracing::warn!(
                    "--dut qemu without --salad-console-port: the VMs' serial output is dropped"
                );
            }
            tracing::info!(
                accel = qemu.accel.name(),
                bridge = %qemu.bridge,
                "outlets are QEMU VMs"
            );
            VpduServer::bind(addr, config, vivian::qemu::qemu_duts(qemu)).await
        }
        (Some(cmd), _) => VpduServer::bind(addr, config, command_duts(cmd)).await,
        (None, Some(url)) => {
            VpduServer::bind(
                addr,
                config,
                vivian::simdut::sim_duts_with_dhcp(
                    url.trim_end_matches('/').to_string(),
                    args.console_host,
                    args.dhcp_server
                        .map(|server| vivian::simdut::SimDhcpConfig {
                            interface: args.dhcp_interface.clone(),
                            ..vivian::simdut::SimDhcpConfig::new(server)
                        }),
                ),
            )
            .await
        }
        (None, None) => VpduServer::bind(addr, config, idle_duts()).await,
    }
    .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
    let local = server.local_addr()?;
    // Tests and scripts read this line to find a port picked with --port 0.
    println!("vpdu: listening on {local} with {} outlets", args.num_ports);
    server
        .serve(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = term.recv() => {},
            }
        })
        .await;
    Ok(())
}
