//! Console streams (serial ports, netconsole connections, in-process
//! streams): reading, line processing (binding, ping), writing.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use regex::bytes::Regex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use vivian_core::console::LineSplitter;

use crate::machine::Machine;
use crate::salad::Inner;

/// What a console is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleKind {
    /// A serial port found by the glob scan (the path as matched, before
    /// following symbolic links).
    Serial {
        /// The device path.
        path: PathBuf,
    },
    /// A TCP connection to the netconsole port.
    Net,
    /// A stream handed over by the embedding program.
    Stream,
}

/// Bytes queued towards one console before further input is dropped.
const CONSOLE_WRITE_QUEUE: usize = 1024;

pub(crate) struct Console {
    pub(crate) name: String,
    pub(crate) console_id: Option<String>,
    pub(crate) kind: ConsoleKind,
    tx: mpsc::Sender<Bytes>,
    pub(crate) machine: Mutex<Option<Arc<Machine>>>,
    closed: watch::Sender<bool>,
}

fn machine_id_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"(?-u)SALAD.machine_id=(\S+)").unwrap())
}

fn ping_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"(?-u)SALAD.ping").unwrap())
}

/// The literal every control line contains: one substring search (the
/// regex crate runs a pure literal as `memmem`) rules out almost every
/// console line before the capturing regexes run.
fn salad_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"(?-u)SALAD").unwrap())
}

impl Console {
    pub(crate) fn machine(&self) -> Option<Arc<Machine>> {
        self.machine.lock().unwrap().clone()
    }

    pub(crate) fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// Ask the console's tasks to stop.
    pub(crate) fn close(&self) {
        self.closed.send_replace(true);
    }

    /// Queue bytes towards the console (the DUT).
    pub(crate) fn send(&self, data: &[u8]) {
        if self.is_closed() {
            return;
        }
        if self.tx.try_send(Bytes::copy_from_slice(data)).is_err() {
            tracing::warn!(
                console = %self.name,
                "console input queue full or closed: dropped {} bytes",
                data.len()
            );
        }
    }
}

/// Start the tasks of a console over `stream`, registering it in `inner`.
pub(crate) fn spawn_console<S>(
    inner: &Arc<Inner>,
    name: String,
    console_id: Option<String>,
    kind: ConsoleKind,
    stream: S,
) -> Arc<Console>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (tx, rx) = mpsc::channel(CONSOLE_WRITE_QUEUE);
    let console = Arc::new(Console {
        name,
        console_id,
        kind,
        tx,
        machine: Mutex::new(None),
        closed: watch::Sender::new(false),
    });
    let (reader, writer) = tokio::io::split(stream);
    inner.add_console(&console);
    if inner.is_shut_down() {
        // Shutdown closed the consoles it knew; this one came too late.
        console.close();
    }
    tokio::spawn(write_loop(console.clone(), writer, rx));
    tokio::spawn(read_loop(inner.clone(), console.clone(), reader));
    console
}

async fn write_loop<W: AsyncWrite + Unpin>(
    console: Arc<Console>,
    mut w: W,
    mut rx: mpsc::Receiver<Bytes>,
) {
    let mut closed = console.closed.subscribe();
    loop {
        let data = tokio::select! {
            d = rx.recv() => d,
            _ = closed.wait_for(|c| *c) => None,
        };
        let Some(data) = data else { break };
        if console.is_closed() {
            break;
        }
        if let Err(e) = w.write_all(&data).await {
            tracing::warn!(console = %console.name, "write to console failed: {e}");
            console.close();
            break;
        }
    }
}

/// Size of the read buffer of a console.
const READ_BUF: usize = 8192;

async fn read_loop<R: AsyncRead + Unpin>(inner: Arc<Inner>, console: Arc<Console>, mut r: R) {
    let mut splitter = LineSplitter::new(inner.config.max_line);
    let mut buf = vec![0u8; READ_BUF];
    let mut unbound: Vec<u8> = Vec::new();
    let max_unbound = inner.config.max_unbound_backlog;
    // Only this task (and `add_console`, before it starts) binds the
    // console: the machine is kept here instead of being looked up under a
    // lock for every read.
    let mut machine = console.machine();
    // Shutdown closes every console, so the console's own signal is the only
    // one to wait for: the multiplexer-wide shutdown channel is shared by
    // every task, and polling it for each chunk made the worker threads
    // contend on its lock. Built once: re-creating the wait future for every
    // read registers and unregisters a waiter per chunk.
    let mut closed = console.closed.subscribe();
    let stop = async move {
        let _ = closed.wait_for(|c| *c).await;
    };
    tokio::pin!(stop);
    loop {
        let n = tokio::select! {
            biased;
            _ = &mut stop => break,
            r = r.read(&mut buf) => match r {
                Ok(0) => { tracing::info!(console = %console.name, "console closed (end of stream)"); break }
                Ok(n) => n,
                Err(e) => { tracing::info!(console = %console.name, "console closed: {e}"); break }
            },
        };
        let data = &buf[..n];
        let mut new_id: Option<Vec<u8>> = None;
        let mut pings = 0usize;
        splitter.push(data, |line| {
            tracing::trace!(console = %console.name, line = ?String::from_utf8_lossy(line.bytes), "console line");
            if !salad_re().is_match(line.bytes) {
                return;
            }
            if let Some(c) = machine_id_re().captures(line.bytes) {
                new_id = Some(c[1].to_vec());
            }
            if ping_re().is_match(line.bytes) {
                pings += 1;
            }
        });
        for _ in 0..pings {
            console.send(b"SALAD.pong\n");
        }
        if let Some(id) = new_id {
            match String::from_utf8(id) {
                Ok(id) => {
                    inner.bind(&console, &id);
                    machine = console.machine();
                }
                Err(e) => tracing::warn!(
                    console = %console.name,
                    "ignoring a SALAD.machine_id that is not UTF-8: {:?}",
                    String::from_utf8_lossy(e.as_bytes())
                ),
            }
        }
        match &machine {
            Some(m) => {
                if !unbound.is_empty() {
                    m.publish(&unbound);
                    unbound = Vec::new();
                }
                m.publish(data);
            }
            None => {
                unbound.extend_from_slice(data);
                if unbound.len() > max_unbound {
                    let cut = unbound.len() - max_unbound;
                    unbound.drain(..cut);
                }
            }
        }
    }
    console.close();
    inner.remove_console(&console);
}
