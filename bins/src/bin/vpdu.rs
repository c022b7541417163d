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
    /// Host of SALAD's netconsole for the simulated DUTs.
    #[arg(long, default_value = "127.0.0.1")]
    console_host: String,
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
        (Some(cmd), _) => VpduServer::bind(addr, config, command_duts(cmd)).await,
        (None, Some(url)) => {
            VpduServer::bind(
                addr,
                config,
                vivian::simdut::sim_duts(url.trim_end_matches('/').to_string(), args.console_host),
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
