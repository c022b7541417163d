//! Serial consoles as the executor sees them.
//!
//! A DUT's serial console reaches the executor through a [`ConsoleSource`]:
//! either a SALAD service over the network (`SALAD_URL`, the client lives in
//! the `vivian-salad` crate) or the same multiplexer embedded in the process.
//! Attaching to a machine's console gives a raw byte stream in both
//! directions ([`ConsoleAttachment`]); the executor splits what it reads into
//! lines with [`LineSplitter`] to match the job's console patterns.
//!
//! Invariants of every implementation:
//! - bytes are delivered raw, in order, without framing or re-encoding;
//! - at most one read-write attachment per machine exists at a time (a second
//!   one is refused with [`ConsoleError::Busy`]); read-only observers are not
//!   part of this trait (SALAD's `tcp_port_logs`);
//! - the offsets of [`ConsoleAttachment::start_offset`] and
//!   [`ConsoleSource::read_log`] count bytes of the same per-machine stream,
//!   so a client can fetch exactly the bytes it missed before attaching or
//!   while it was disconnected.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};

/// What a console source knows about one machine (SALAD's machine object:
/// `{"id", "tcp_port", "has_client", "tcp_port_logs"}`, in that order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleMachine {
    /// The machine id (for DUTs: the lowercase colon-separated MAC address).
    pub id: String,
    /// TCP port of the machine's read-write console (one client at a time).
    pub tcp_port: u16,
    /// Whether a read-write client is attached right now.
    pub has_client: bool,
    /// TCP port for read-only observers of the console (any number).
    pub tcp_port_logs: u16,
}

/// The read half of an attachment: the console's output, raw bytes.
/// End of stream means the attachment was closed by the source.
pub type ConsoleReader = Box<dyn AsyncRead + Send + Unpin>;

/// The write half of an attachment: bytes written here go to the console
/// bound to the machine (they are dropped, with a warning in the source's
/// logs, while no console is bound).
pub type ConsoleWriter = Box<dyn AsyncWrite + Send + Unpin>;

/// A read-write attachment to one machine's console.
pub struct ConsoleAttachment {
    /// The machine attached to.
    pub machine_id: String,
    /// Console output, from the moment of attaching.
    pub reader: ConsoleReader,
    /// Input to the console.
    pub writer: ConsoleWriter,
    /// Offset, in the machine's console log, of the first byte `reader` will
    /// yield: the bytes before it can be fetched with
    /// [`ConsoleSource::read_log`]. `None` when the source cannot tell (a
    /// reference SALAD, which keeps no log).
    pub start_offset: Option<u64>,
}

impl std::fmt::Debug for ConsoleAttachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleAttachment")
            .field("machine_id", &self.machine_id)
            .field("start_offset", &self.start_offset)
            .finish_non_exhaustive()
    }
}

/// A piece of a machine's console log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogChunk {
    /// Offset of `data[0]` in the machine's console stream.
    pub offset: u64,
    /// The bytes, possibly fewer than asked for (end of log or size cap).
    pub data: Vec<u8>,
    /// Total length of the log when it was read: the offset the next byte
    /// of the console will have.
    pub size: u64,
}

/// Outcome of a console reset request that the source could perform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResetOutcome {
    /// The console's adapter was power-cycled.
    Done,
    /// Reset is impossible for this console (no console bound, a network
    /// console, an adapter without per-port power switching...): the text
    /// says why. SALAD answers 501 in this case.
    Unsupported(String),
}

/// Errors of a console source. Every message names what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// The console source could not be reached or answered nonsense.
    #[error("console source {source_name} unavailable: {reason}")]
    Unavailable {
        /// Which source (the SALAD URL, "in-process", ...).
        source_name: String,
        /// What went wrong.
        reason: String,
    },
    /// Another read-write client is attached to this machine's console.
    #[error("the console of machine {machine_id} already has a read-write client: {message}")]
    Busy {
        /// The machine.
        machine_id: String,
        /// The source's message (SALAD: `ERROR: A client is already connected, re-try later!`).
        message: String,
    },
    /// The machine id cannot be a console machine id.
    #[error("invalid console machine id {machine_id:?}: {reason}")]
    InvalidMachineId {
        /// The offending id.
        machine_id: String,
        /// Why it is refused.
        reason: String,
    },
    /// The operation is not available from this source.
    #[error("{operation} is not supported by console source {source_name}")]
    NotSupported {
        /// What was asked.
        operation: String,
        /// Which source.
        source_name: String,
    },
    /// The request could not be carried out (I/O error, reset failure...).
    #[error("console operation on machine {machine_id} failed: {reason}")]
    Failed {
        /// The machine.
        machine_id: String,
        /// What went wrong.
        reason: String,
    },
}

/// Where the executor gets DUT consoles from.
///
/// Object-safe: the executor holds an `Arc<dyn ConsoleSource>`.
#[async_trait]
pub trait ConsoleSource: Send + Sync {
    /// A short human-readable name of the source, for logs and errors
    /// (for example the SALAD URL).
    fn name(&self) -> String;

    /// Every machine the source knows about.
    async fn machines(&self) -> Result<Vec<ConsoleMachine>, ConsoleError>;

    /// One machine, created on first mention as SALAD does (so that its
    /// ports exist before its console ever prints its id).
    async fn machine(&self, machine_id: &str) -> Result<ConsoleMachine, ConsoleError>;

    /// Attach read-write to a machine's console. Dropping both halves of the
    /// attachment detaches. Fails with [`ConsoleError::Busy`] while another
    /// read-write client is attached.
    async fn attach(&self, machine_id: &str) -> Result<ConsoleAttachment, ConsoleError>;

    /// Reset (power-cycle) the machine's console adapter, where possible.
    async fn reset(&self, machine_id: &str) -> Result<ResetOutcome, ConsoleError>;

    /// Read up to `max_len` bytes of the machine's console log from `offset`
    /// (see [`ConsoleAttachment::start_offset`]).
    async fn read_log(
        &self,
        machine_id: &str,
        offset: u64,
        max_len: usize,
    ) -> Result<LogChunk, ConsoleError>;
}

/// Default bound of [`LineSplitter`]: a line longer than 64 KiB without a
/// `\n` is cut into 64 KiB pieces.
pub const DEFAULT_MAX_LINE: usize = 64 * 1024;

/// One line produced by a [`LineSplitter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Line<'a> {
    /// The bytes of the line, including its `\n` (and `\r` before it, if
    /// any) when `complete`.
    pub bytes: &'a [u8],
    /// `true` when the line ends with `\n`; `false` for a piece of an
    /// over-long line cut at the bound, or for the last partial line given
    /// out by [`LineSplitter::finish`].
    pub complete: bool,
}

/// Splits a console byte stream into lines for pattern matching.
///
/// - A line is the bytes up to and including `\n`, prefixed by whatever
///   partial line earlier reads left over: `\r\n` is kept, as the reference
///   does, so patterns end with `\r$`.
/// - Any byte sequence is accepted (invalid UTF-8, NUL, control bytes): lines
///   are bytes, never decoded.
/// - Bound: a partial line never holds more than `max_line` bytes
///   ([`DEFAULT_MAX_LINE`] by default). When a line reaches the bound without
///   a `\n`, its first `max_line` bytes are given out as an incomplete line
///   (`complete == false`) and the rest continues as a new line. Memory use is
///   therefore at most `max_line` bytes per splitter.
#[derive(Debug, Clone)]
pub struct LineSplitter {
    partial: Vec<u8>,
    max_line: usize,
}

impl Default for LineSplitter {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_LINE)
    }
}

impl LineSplitter {
    /// A splitter cutting lines longer than `max_line` bytes (at least 1).
    pub fn new(max_line: usize) -> Self {
        Self {
            partial: Vec::new(),
            max_line: max_line.max(1),
        }
    }

    /// The bound on a line's length.
    pub fn max_line(&self) -> usize {
        self.max_line
    }

    /// The partial line buffered so far (bytes after the last `\n`).
    pub fn pending(&self) -> &[u8] {
        &self.partial
    }

    /// Feed bytes read from the console; `on_line` is called for each line
    /// they complete, in order. Bytes after the last `\n` are kept for the
    /// next call.
    pub fn push(&mut self, mut data: &[u8], mut on_line: impl FnMut(Line<'_>)) {
        while !data.is_empty() {
            let room = self.max_line - self.partial.len();
            let window = &data[..data.len().min(room)];
            match memchr::memchr(b'\n', window) {
                Some(i) => {
                    let (line, rest) = data.split_at(i + 1);
                    if self.partial.is_empty() {
                        on_line(Line {
                            bytes: line,
                            complete: true,
                        });
                    } else {
                        self.partial.extend_from_slice(line);
                        on_line(Line {
                            bytes: &self.partial,
                            complete: true,
                        });
                        self.partial.clear();
                    }
                    data = rest;
                }
                None if window.len() == room => {
                    // The line reaches the bound: give out a full piece.
                    let (piece, rest) = data.split_at(room);
                    if self.partial.is_empty() {
                        on_line(Line {
                            bytes: piece,
                            complete: false,
                        });
                    } else {
                        self.partial.extend_from_slice(piece);
                        on_line(Line {
                            bytes: &self.partial,
                            complete: false,
                        });
                        self.partial.clear();
                    }
                    data = rest;
                }
                None => {
                    self.partial.extend_from_slice(data);
                    data = &[];
                }
            }
        }
    }

    /// Drops the partial line buffered so far (a new stream starts).
    pub fn clear(&mut self) {
        self.partial.clear();
    }

    /// End of stream: give out the partial line left, if any, as an
    /// incomplete line.
    pub fn finish(&mut self, mut on_line: impl FnMut(Line<'_>)) {
        if !self.partial.is_empty() {
            on_line(Line {
                bytes: &self.partial,
                complete: false,
            });
            self.partial.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(splitter: &mut LineSplitter, chunks: &[&[u8]]) -> Vec<(Vec<u8>, bool)> {
        let mut out = Vec::new();
        for c in chunks {
            splitter.push(c, |l| out.push((l.bytes.to_vec(), l.complete)));
        }
        out
    }

    #[test]
    fn keeps_crlf_and_partial_lines_across_reads() {
        // The reference's own chunked example.
        let mut s = LineSplitter::default();
        let lines = split(
            &mut s,
            &[
                b"hello w",
                b"orld\nSALAD.ping\r\nSALAD.machine_id=machine1\ninterr",
                b"upted line...",
            ],
        );
        assert_eq!(
            lines,
            vec![
                (b"hello world\n".to_vec(), true),
                (b"SALAD.ping\r\n".to_vec(), true),
                (b"SALAD.machine_id=machine1\n".to_vec(), true),
            ]
        );
        assert_eq!(s.pending(), b"interrupted line...");
        let mut last = Vec::new();
        s.finish(|l| last.push((l.bytes.to_vec(), l.complete)));
        assert_eq!(last, vec![(b"interrupted line...".to_vec(), false)]);
        assert!(s.pending().is_empty());
    }

    #[test]
    fn byte_at_a_time_gives_the_same_lines() {
        let text: &[u8] = b"a\r\n\nbb\x00\xff\xfe\r\nccc";
        let mut whole = LineSplitter::default();
        let a = split(&mut whole, &[text]);
        let mut bytes = LineSplitter::default();
        let chunks: Vec<&[u8]> = text.chunks(1).collect();
        let b = split(&mut bytes, &chunks);
        assert_eq!(a, b);
        assert_eq!(
            a,
            vec![
                (b"a\r\n".to_vec(), true),
                (b"\n".to_vec(), true),
                (b"bb\x00\xff\xfe\r\n".to_vec(), true),
            ]
        );
        assert_eq!(whole.pending(), b"ccc");
        assert_eq!(bytes.pending(), b"ccc");
    }

    #[test]
    fn long_lines_are_cut_at_the_bound() {
        let mut s = LineSplitter::new(4);
        let lines = split(&mut s, &[b"ab", b"cdefghij\nxy", b"z\n"]);
        assert_eq!(
            lines,
            vec![
                (b"abcd".to_vec(), false),
                (b"efgh".to_vec(), false),
                (b"ij\n".to_vec(), true),
                (b"xyz\n".to_vec(), true),
            ]
        );
        // A line of exactly max_line bytes including '\n' is complete.
        let lines = split(&mut s, &[b"abc\n"]);
        assert_eq!(lines, vec![(b"abc\n".to_vec(), true)]);
        assert!(s.pending().len() <= s.max_line());
    }

    #[test]
    fn nothing_is_lost_whatever_the_chunking() {
        // Concatenating every line plus the pending rest gives back the input.
        let mut input = Vec::new();
        for i in 0..2000u32 {
            input.extend_from_slice(&i.to_le_bytes());
            if i % 7 == 0 {
                input.push(b'\n');
            }
        }
        for &(max, chunk) in &[(16usize, 1usize), (16, 5), (3, 7), (1000, 333), (1, 2)] {
            let mut s = LineSplitter::new(max);
            let mut out = Vec::new();
            for c in input.chunks(chunk) {
                s.push(c, |l| {
                    assert!(l.bytes.len() <= max);
                    assert_eq!(l.complete, l.bytes.last() == Some(&b'\n'));
                    out.extend_from_slice(l.bytes)
                });
            }
            s.finish(|l| out.extend_from_slice(l.bytes));
            assert_eq!(out, input, "max {max} chunk {chunk}");
        }
    }

    #[test]
    fn console_machine_json_shape_matches_salad() {
        let m = ConsoleMachine {
            id: "52:54:00:12:34:56".into(),
            tcp_port: 1234,
            has_client: false,
            tcp_port_logs: 1235,
        };
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"id":"52:54:00:12:34:56","tcp_port":1234,"has_client":false,"tcp_port_logs":1235}"#
        );
    }
}
