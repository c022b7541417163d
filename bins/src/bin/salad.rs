//! `salad`: the serial console multiplexer, a drop-in for the reference
//! SALAD (PyPI `valve-gfx-ci.salad` 0.0.2). Configured by the environment:
//!
//! - `SALAD_PORT` (8005): HTTP API port, unless systemd socket activation
//!   passes listening sockets (all inherited stream sockets serve the API,
//!   named or not, as the reference does; read with the `sd-listen-fds`
//!   crate directly because `vivian_boots::activation` hands sockets out by
//!   name only);
//! - `SALAD_TCPCONSOLE_PORT` (8006), `SALAD_TCPCONSOLE_HOST` (0.0.0.0):
//!   netconsole listener;
//! - `SALAD_MACHINE_HOST` (0.0.0.0): address of the per-machine ports;
//! - `SALAD_SERIAL_GLOBS` (`/dev/ttyUSB*,/dev/ttyACM*`): serial ports,
//!   seen as they are plugged in through inotify watches on their
//!   directories; `SALAD_SERIAL_SCAN_MS` (500): retry period of a port that
//!   failed to open (and the scan period where inotify is unavailable);
//! - `SALAD_LOG_DIR` (`/var/log/salad`, empty to disable): console logs;
//! - `SALAD_CONSOLE_USB_RESET_DISABLE`, `SALAD_CONSOLE_USB_RESET_POWER_OFF_TIME`;
//! - `SALAD_BATCH_MS` (2, 0-20; 0 disables it) and `SALAD_THREADS` (1):
//!   wake-up batching and threads of the runtime, see `vivian_salad::runtime`.
//!
//! Command line: `--help`, `--version`; any other argument is an error (the
//! reference takes none).

use anyhow::Context;
use vivian_salad::{serve_http, Salad, SaladConfig};

const USAGE: &str = "usage: salad [--help | --version]\n\nA SALAD-compatible serial console multiplexer, configured by environment variables (SALAD_PORT, SALAD_TCPCONSOLE_PORT, SALAD_TCPCONSOLE_HOST, SALAD_MACHINE_HOST, SALAD_SERIAL_GLOBS, SALAD_SERIAL_SCAN_MS, SALAD_LOG_DIR, SALAD_BATCH_MS, SALAD_THREADS, ...): see the vivian-salad crate documentation.";

fn main() -> anyhow::Result<()> {
    if let Some(arg) = std::env::args().nth(1) {
        match arg.as_str() {
            "--help" | "-h" => println!("{USAGE}"),
            "--version" | "-V" => println!("salad (vivian) {}", env!("CARGO_PKG_VERSION")),
            _ => {
                eprintln!("salad: unexpected argument {arg:?}: salad is configured by environment variables\n\n{USAGE}");
                std::process::exit(2);
            }
        }
        return Ok(());
    }
    let config = SaladConfig::from_env()?;
    let runtime = vivian_salad::runtime::build(config.batch, config.threads)
        .context("cannot start the multiplexer's runtime")?;
    runtime.block_on(serve(config))
}

async fn serve(config: SaladConfig) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();

    let listeners = socket_activated_listeners()?;
    let mut listeners = listeners;
    let http_port = config.http_port;
    let salad = Salad::start(config).await?;
    // Code that only start-up ran is unmapped once start-up is over.
    let _release = vivian::memory::spawn_start_up_release(
        !vivian::memory::environment_tunes_malloc(std::env::vars()),
    );
    if listeners.is_empty() {
        let l = std::net::TcpListener::bind(("0.0.0.0", http_port)).with_context(|| {
            format!("cannot listen for the HTTP API on port {http_port} (SALAD_PORT)")
        })?;
        listeners.push(l);
    } else {
        tracing::info!(
            "using {} socket-activated HTTP listener(s)",
            listeners.len()
        );
    }
    for l in listeners {
        l.set_nonblocking(true)?;
        let addr = l.local_addr()?;
        tracing::info!(%addr, "HTTP API listening");
        tokio::spawn(serve_http(
            salad.clone(),
            tokio::net::TcpListener::from_std(l)?,
        ));
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    salad.shutdown().await;
    Ok(())
}

/// Every socket-activated TCP listening socket, whatever its name.
fn socket_activated_listeners() -> anyhow::Result<Vec<std::net::TcpListener>> {
    let fds = sd_listen_fds::get().map_err(|e| {
        anyhow::anyhow!("malformed socket activation environment (LISTEN_PID/LISTEN_FDS): {e}")
    })?;
    let mut out = Vec::new();
    for (name, fd) in fds {
        let sock = socket2::Socket::from(fd.into_std());
        match sock.r#type() {
            Ok(t) if t == socket2::Type::STREAM => {
                sock.set_cloexec(true)?;
                out.push(std::net::TcpListener::from(sock));
            }
            _ => tracing::warn!(
                ?name,
                "ignoring a socket-activated descriptor that is not a stream socket"
            ),
        }
    }
    Ok(out)
}
