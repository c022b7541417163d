//! Serial ports as async byte streams.
//!
//! The port is opened and configured (raw mode, the baud rate, exclusive
//! access) by the `serialport` crate through `tokio-serial`'s builder; its
//! descriptor then goes into a [`tokio::io::unix::AsyncFd`] read and written
//! here. What this adds over `tokio_serial::SerialStream`: a read that
//! returns less than the buffer's room drained the port, so the readiness is
//! cleared right away (tokio's sockets do the same) instead of being found
//! out by one more `read` that fails with `EAGAIN`. A console at 115200 baud
//! wakes the multiplexer for a few hundred bytes at a time, so that was one
//! wasted system call per wake-up: `salad-bench --serial` (500 consoles,
//! 100 ms chunks) went from 2.0 to 1.0 `read` per chunk and from 41.8-43.4
//! to 40.6-41.0 µs of CPU per chunk.
//!
//! Clearing is race-free: [`tokio::io::unix::AsyncFdReadyGuard::clear_ready`]
//! keeps the readiness when the port signalled new data after the guard was
//! taken.

use std::io;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A pseudo-terminal pair in raw mode (no echo, no line editing, bytes
/// unchanged: a serial line), as tests and benchmarks simulate a serial
/// port with: the program under test opens `slave_path` as it would
/// `/dev/ttyUSB0`, the simulated device writes and reads `master`.
pub struct PtyPair {
    /// The device's side.
    pub master: OwnedFd,
    /// The port's side, open here too: the pair lives while either side is
    /// open.
    pub slave: OwnedFd,
    /// `/dev/pts/<n>`.
    pub slave_path: PathBuf,
}

/// Open a [`PtyPair`].
pub fn pty_pair() -> io::Result<PtyPair> {
    use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
    let pty = nix::pty::openpty(None, None)?;
    let mut t = tcgetattr(&pty.slave)?;
    cfmakeraw(&mut t);
    tcsetattr(&pty.slave, SetArg::TCSANOW, &t)?;
    let slave_path = nix::unistd::ttyname(&pty.slave)?;
    Ok(PtyPair {
        master: pty.master,
        slave: pty.slave,
        slave_path,
    })
}

/// An open serial port.
pub(crate) struct Tty {
    fd: AsyncFd<OwnedFd>,
}

impl Tty {
    /// Open and configure `path` at `baud` (8N1, no flow control, raw) for
    /// exclusive use. Must run inside a tokio runtime.
    pub(crate) fn open(path: &Path, baud: u32) -> io::Result<Tty> {
        let port = tokio_serial::new(path.to_string_lossy(), baud)
            .open_native()
            .map_err(io::Error::from)?;
        // SAFETY: into_raw_fd hands over the open descriptor; nothing else
        // owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(port.into_raw_fd()) };
        let flags = OFlag::from_bits_retain(fcntl(&fd, FcntlArg::F_GETFL)?);
        fcntl(&fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
        // SAFETY: the AsyncFd owns the descriptor, which stays open and the
        // same until the AsyncFd is dropped.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)?;
        Ok(Tty { fd })
    }
}

impl AsyncRead for Tty {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let room = buf.initialize_unfilled();
            let want = room.len();
            let r = guard.try_io(|fd| Ok(nix::unistd::read(fd.get_ref(), room)?));
            match r {
                Ok(Ok(n)) => {
                    if n > 0 && n < want {
                        guard.clear_ready();
                    }
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for Tty {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            let r = guard.try_io(|fd| Ok(nix::unistd::write(fd.get_ref(), data)?));
            match r {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Written bytes are in the kernel's queue towards the port already.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A pty pair: (master, path of the slave); the slave is closed here,
    /// the Tty opens it again by name.
    fn pty() -> (std::fs::File, PathBuf) {
        let p = pty_pair().unwrap();
        (std::fs::File::from(p.master), p.slave_path)
    }

    /// Bytes go both ways unchanged (raw mode: no echo, no CR/LF
    /// translation, NUL and 0xff kept), and a burst larger than one read is
    /// delivered whole although short reads clear the readiness.
    #[tokio::test]
    async fn raw_bytes_both_ways_and_bursts_arrive_whole() {
        use std::io::{Read, Write};
        let (mut master, path) = pty();
        let mut tty = Tty::open(&path, 115_200).unwrap();

        master.write_all(b"a\r\nb\0\xff\n").unwrap();
        let mut got = [0u8; 7];
        tokio::time::timeout(std::time::Duration::from_secs(5), tty.read_exact(&mut got))
            .await
            .expect("timed out")
            .unwrap();
        assert_eq!(&got, b"a\r\nb\0\xff\n");

        tty.write_all(b"to the DUT\n").await.unwrap();
        let mut back = [0u8; 11];
        master.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"to the DUT\n");

        // 64 KiB in pieces, read with a small buffer: many short and full
        // reads, and nothing may be left behind by a cleared readiness.
        let data: Vec<u8> = (0..65536u32).map(|i| (i * 7 % 251) as u8).collect();
        let expected = data.clone();
        let writer = std::thread::spawn(move || {
            for piece in data.chunks(1000) {
                master.write_all(piece).unwrap();
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
            master
        });
        let mut received = Vec::new();
        let mut buf = [0u8; 700];
        while received.len() < expected.len() {
            let n = tokio::time::timeout(std::time::Duration::from_secs(5), tty.read(&mut buf))
                .await
                .expect("bytes stopped arriving")
                .unwrap();
            assert!(n > 0, "end of stream after {} bytes", received.len());
            received.extend_from_slice(&buf[..n]);
        }
        assert_eq!(received, expected);
        drop(writer.join().unwrap());
    }

    #[tokio::test]
    async fn a_missing_port_is_not_found() {
        let e = Tty::open(Path::new("/nonexistent/ttyUSB9"), 115_200)
            .err()
            .expect("opened a missing port");
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
    }
}
