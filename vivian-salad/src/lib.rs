//! # vivian-salad
//!
//! A serial console multiplexer compatible with the reference SALAD (PyPI
//! `valve-gfx-ci.salad` 0.0.2), and the executor's console sources.
//!
//! **Consoles** are serial ports (found by globs, `/dev/ttyUSB*` and
//! `/dev/ttyACM*` by default, re-scanned when their directories change
//! (inotify) and every 10 s, opened at 115200 baud), TCP connections to the
//! netconsole port (8006), and streams handed over in-process
//! ([`Salad::add_stream_console`]).
//!
//! **Binding.** Console input is split into lines
//! ([`vivian_core::console::LineSplitter`]); a line containing
//! `SALAD.machine_id=<id>` binds the console to machine `<id>`; a line
//! containing `SALAD.ping` is answered with `SALAD.pong\n` on that console.
//! A serial port keeps its binding across unplug/replug (identified by its
//! sysfs port, its USB port, else its path). Bytes a console produced before
//! it was bound (the last 256 KiB) go to the machine when it binds.
//!
//! **Machines** are created on first mention (console or API). Each has a
//! read-write TCP port (one client; a second gets
//! `ERROR: A client is already connected, re-try later!\r\n` and is closed) and
//! a read-only port (any number of observers). Bytes are raw, both ways.
//! Every byte of a machine's console is appended to `<log dir>/<id>.log`
//! whether or not a client is attached; offsets into that log let a client
//! fetch what it missed (see [`http`]).
//!
//! **Executor side.** [`SaladClient`] (a SALAD over `SALAD_URL`) and
//! [`InProcessConsoles`] (this multiplexer embedded) implement
//! [`vivian_core::console::ConsoleSource`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use vivian_core::console::ConsoleSource;
//! use vivian_salad::{InProcessConsoles, Salad, SaladConfig};
//!
//! let salad = Salad::start(SaladConfig::local(Some("/tmp/console-logs".into()))).await?;
//! let consoles: Arc<dyn ConsoleSource> = Arc::new(InProcessConsoles::new(salad.clone()));
//! // Virtual DUTs connect to salad.netconsole_addr() and print SALAD.machine_id=<id>.
//! let mut att = consoles.attach("52:54:00:12:34:56").await?;
//! # let _ = &mut att;
//! salad.shutdown().await;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod client;
pub mod config;
mod console;
mod hotplug;
pub mod http;
mod machine;
mod reset;
pub mod runtime;
mod salad;
pub mod tty;

pub use client::{InProcessConsoles, SaladClient, DEFAULT_SALAD_URL};
pub use config::{ConfigError, SaladConfig};
pub use console::ConsoleKind;
pub use http::{routes, serve_http};
pub use machine::{log_file_name, validate_machine_id, ClientInfo, MAX_MACHINE_ID_LEN};
pub use salad::{ConsoleInfo, LocalAttachment, LocalReader, LocalWriter, Salad, SaladError};

/// The message a second read-write client gets (after `ERROR: `), as the
/// reference sends it.
pub const BUSY_MESSAGE: &str = "A client is already connected, re-try later!";
