//! The callback session (EX C.2, C.3, C.5): frames from the executor are
//! shown (console bytes raw, control messages as lines), keystrokes go back
//! as `job_io` when stdin is a terminal, and the `session_end` status is the
//! result.

use std::io::Write;

use indexmap::IndexMap;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use vivian_core::protocol::{read_message, tag, JobBucket, Message, Payload, ProtocolError};

use super::escape::{Escape, Interrupt};
use super::tty::{is_tty, CbreakGuard};
use super::JobStatus;

const HIGHLIGHT: &str = "\x1b[1;91;47m";
const RESET: &str = "\x1b[0m";

/// How often a console pattern matched and the first line it matched.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PatternStats {
    /// Number of matches.
    pub count: u32,
    /// First line matched.
    pub first_line: Option<String>,
}

/// How a session ended.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionOutcome {
    /// The verdict (INCOMPLETE without `session_end`).
    pub status: JobStatus,
    /// The job bucket offered in `session_end`.
    pub job_bucket: Option<JobBucket>,
    /// Patterns reported by tagged control messages (V2025 executors).
    pub patterns: IndexMap<String, PatternStats>,
}

impl SessionOutcome {
    /// Prints the matched patterns, as the reference client does.
    pub fn print_pattern_summary(&self) {
        if self.patterns.is_empty() {
            return;
        }
        println!("\nConsole patterns matched ($pattern($match_count): $first_line_matched):\n");
        for (name, s) in &self.patterns {
            println!(
                " * {name}({}): {}",
                s.count,
                s.first_line.as_deref().unwrap_or("").trim()
            );
        }
        println!();
    }
}

enum Event {
    Message(Result<Option<Message>, ProtocolError>),
    Keys(Vec<u8>),
    Interrupt,
}

/// Runs the session on the executor's connection until `session_end`, the
/// end of the connection or a Ctrl-A Ctrl-C quit. With `interactive` and a
/// terminal on stdin, the terminal is put in cbreak mode and keystrokes are
/// forwarded.
pub async fn run(stream: TcpStream, interactive: bool) -> SessionOutcome {
    run_then(stream, interactive, |_| async {}).await
}

/// [`run`], then `at_end` with the outcome before the connection is
/// closed: the executor keeps the job bucket until the client closes, so
/// the share directory is mirrored back from here (EX C.4).
pub async fn run_then<F, Fut>(stream: TcpStream, interactive: bool, at_end: F) -> SessionOutcome
where
    F: FnOnce(SessionOutcome) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let (mut reader, mut writer) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<Event>(64);

    let net_tx = tx.clone();
    let reader_task = tokio::spawn(async move {
        loop {
            let m = read_message(&mut reader).await;
            let stop =
                !matches!(&m, Ok(Some(_))) && !matches!(&m, Err(ProtocolError::UnknownType(_)));
            if net_tx.send(Event::Message(m)).await.is_err() || stop {
                break;
            }
        }
    });

    let _guard = if interactive && is_tty(0) {
        match CbreakGuard::new(0) {
            Ok(g) => {
                spawn_stdin_reader(tx.clone());
                Some(g)
            }
            Err(e) => {
                eprintln!("WARNING: cannot set the terminal in cbreak mode, keystrokes are not forwarded: {e}");
                None
            }
        }
    } else {
        None
    };
    match signal(SignalKind::interrupt()) {
        Ok(mut sig) => {
            let sig_tx = tx.clone();
            tokio::spawn(async move {
                while sig.recv().await.is_some() {
                    if sig_tx.send(Event::Interrupt).await.is_err() {
                        break;
                    }
                }
            });
        }
        Err(e) => eprintln!("WARNING: cannot catch Ctrl-C: {e}"),
    }
    drop(tx);

    let mut outcome = SessionOutcome {
        status: JobStatus::Incomplete,
        job_bucket: None,
        patterns: IndexMap::new(),
    };
    let mut escape = Escape::new();
    let mut stdout = std::io::stdout();
    // Whether the console output shown so far ends a line: a control
    // message (a timeout hit while the DUT is mid-line) starts a new one.
    let mut at_line_start = true;
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Message(Ok(Some(msg))) => match msg.payload {
                Payload::JobIo(data) => {
                    if let Some(last) = data.last() {
                        at_line_start = *last == b'\n';
                    }
                    let _ = stdout.write_all(&data);
                    let _ = stdout.flush();
                }
                Payload::Control(c) => {
                    if c.tag == tag::DUT_CONSOLE_PATTERN_MATCHED {
                        record_patterns(&mut outcome.patterns, &c.metadata);
                    }
                    let text = c.msg.trim_end();
                    if !at_line_start {
                        let _ = writeln!(stdout);
                        at_line_start = true;
                    }
                    if c.tag == tag::DUT_CONSOLE_PATTERN_MATCHED || c.tag == tag::TIMEOUT_HIT {
                        let _ = writeln!(stdout, "{HIGHLIGHT}{text}{RESET}");
                    } else {
                        let _ = writeln!(stdout, "{text}");
                    }
                    let _ = stdout.flush();
                }
                Payload::SessionEnd(end) => {
                    outcome.status = end.status;
                    outcome.job_bucket = end.job_bucket;
                    break;
                }
            },
            Event::Message(Ok(None)) => {
                eprintln!("\nThe executor closed the connection before the end of the session");
                break;
            }
            Event::Message(Err(ProtocolError::UnknownType(t))) => {
                eprintln!("\nWARNING: ignoring a message of unknown type '{t}'");
            }
            Event::Message(Err(e)) => {
                eprintln!("\nERROR: {e}");
                break;
            }
            Event::Keys(keys) => {
                let (data, quit) = escape.keys(&keys);
                if !data.is_empty() && send(&mut writer, data).await.is_err() {
                    eprintln!("\nWARNING: could not forward keystrokes to the executor");
                }
                if quit {
                    eprintln!("\nExiting the client in response to Ctrl-A Ctrl-C...");
                    break;
                }
            }
            Event::Interrupt => match escape.interrupt() {
                Interrupt::Quit => {
                    eprintln!("\nExiting the client in response to Ctrl-C...");
                    break;
                }
                Interrupt::Forward => {
                    eprintln!("\nForwarding Ctrl-C to the job; type Ctrl-A then Ctrl-C to quit the client");
                    let _ = send(&mut writer, vec![super::escape::CTRL_C]).await;
                }
            },
        }
    }
    reader_task.abort();
    at_end(outcome.clone()).await;
    let _ = writer.shutdown().await;
    outcome
}

async fn send(
    writer: &mut tokio::net::tcp::OwnedWriteHalf,
    data: Vec<u8>,
) -> Result<(), ProtocolError> {
    vivian_core::protocol::write_message(writer, &Message::job_io(data)).await
}

fn record_patterns(
    stats: &mut IndexMap<String, PatternStats>,
    metadata: &serde_json::Map<String, serde_json::Value>,
) {
    let line = metadata.get("line").and_then(|l| l.as_str());
    for p in metadata
        .get("patterns")
        .and_then(|p| p.as_array())
        .into_iter()
        .flatten()
    {
        if let Some(name) = p.as_str() {
            let s = stats.entry(name.to_string()).or_default();
            s.count += 1;
            if s.first_line.is_none() {
                s.first_line = line.map(str::to_string);
            }
        }
    }
}

/// Reads stdin on a blocking thread (stdin cannot be read asynchronously
/// without taking it over) and sends the keys to the session.
fn spawn_stdin_reader(tx: mpsc::Sender<Event>) {
    std::thread::spawn(move || {
        use std::io::Read;
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 1024];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.blocking_send(Event::Keys(buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
    });
}
