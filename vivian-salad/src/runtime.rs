//! The runtime the `salad` binary runs the multiplexer on.
//!
//! Forwarding a console chunk costs little in user space; what costs is the
//! kernel work around it: the `recv` from the console, the `send` to each
//! client (on loopback the sender also pays the receiver's TCP processing
//! and its wake-up), and the wake-ups of the multiplexer itself. Measured
//! with `salad-bench` (500 consoles), a multi-thread runtime woke its idle
//! workers for most console chunks (0.5 context switches and 0.45 futex
//! calls per chunk besides the `recv` and `send`); a single thread that
//! waits a little before polling its sockets again serves the same load
//! with 20-40 % less CPU (18 against 29-31 us per chunk at 50,000
//! chunks/s).
//!
//! [`build`] therefore returns, by default, a current-thread runtime whose
//! thread, when it runs out of work, sleeps until [`DEFAULT_BATCH`] has
//! passed since it last woke up before it polls the sockets again:
//! everything that arrived in the meantime is then handled in one pass, with
//! one `epoll_wait`, instead of one wake-up per chunk. A byte waits at most
//! that long more than it would have (2 ms against a 5 ms latency budget);
//! when the multiplexer has work it never sleeps. On the development VM a
//! wake-up (the sleep, the timer, the context switches, `epoll_wait`)
//! costs about 30 us, two to three times the forwarding of a console
//! chunk, so the delay is what the CPU figure follows: at 500 consoles
//! sending 1,152-byte chunks every 100 ms, 1 ms batching took 8.1-9.1 % of
//! a core (p99 latency 1.3 ms), 2 ms 6.9-7.6 % (p99 2.3 ms), 3 ms 6.6 %
//! (p99 3.3 ms); 2 ms keeps a margin under the latency budget. One thread
//! forwards about 50,000 console chunks per second on the 2-core
//! development machine; a farm whose consoles produce more can give the
//! runtime more threads (`SALAD_THREADS`), each batching its wake-ups the
//! same way.

use std::cell::Cell;
use std::io;
use std::time::{Duration, Instant};

/// Default batching delay of [`build`]: how long the runtime's thread waits,
/// counted from its last wake-up, before it polls its sockets again.
pub const DEFAULT_BATCH: Duration = Duration::from_millis(2);

/// The most threads [`build`] accepts.
pub const MAX_THREADS: usize = 64;

/// The longest batching delay [`build`] accepts: beyond it the added latency
/// stops being negligible for an interactive console.
pub const MAX_BATCH: Duration = Duration::from_millis(20);

thread_local! {
    /// When this thread last came back from parking.
    static LAST_UNPARK: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Build the multiplexer's runtime: `threads` worker threads (1: a
/// current-thread runtime), I/O and timers enabled, wake-ups batched by
/// `batch` (`Duration::ZERO` disables the batching). `batch` above
/// [`MAX_BATCH`], or `threads` outside 1..=[`MAX_THREADS`], is an error
/// naming the limit.
pub fn build(batch: Duration, threads: usize) -> io::Result<tokio::runtime::Runtime> {
    if batch > MAX_BATCH {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("console batching delay {batch:?} is above the maximum of {MAX_BATCH:?}"),
        ));
    }
    if !(1..=MAX_THREADS).contains(&threads) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{threads} runtime threads: expected 1 to {MAX_THREADS}"),
        ));
    }
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    builder.enable_all();
    if !batch.is_zero() {
        builder
            .on_thread_park(move || {
                if let Some(last) = LAST_UNPARK.with(Cell::get) {
                    let awake = last.elapsed();
                    if awake < batch {
                        std::thread::sleep(batch - awake);
                    }
                }
            })
            .on_thread_unpark(|| LAST_UNPARK.with(|l| l.set(Some(Instant::now()))));
    }
    builder.build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batching_delay_above_the_maximum_is_refused_with_the_limit() {
        let e = build(MAX_BATCH + Duration::from_millis(1), 1).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("20ms"), "{e}");
        for threads in [0, MAX_THREADS + 1] {
            let e = build(DEFAULT_BATCH, threads).unwrap_err();
            assert!(e.to_string().contains("expected 1 to 64"), "{e}");
        }
    }

    #[test]
    fn the_batched_runtime_runs_io_and_timers() {
        for (batch, threads) in [(Duration::ZERO, 1), (DEFAULT_BATCH, 1), (DEFAULT_BATCH, 2)] {
            let rt = build(batch, threads).unwrap();
            let got = rt.block_on(async {
                let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let addr = l.local_addr().unwrap();
                let send = tokio::spawn(async move {
                    use tokio::io::AsyncWriteExt;
                    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    c.write_all(b"console bytes").await.unwrap();
                });
                let (mut s, _) = l.accept().await.unwrap();
                let mut buf = Vec::new();
                tokio::io::AsyncReadExt::read_to_end(&mut s, &mut buf)
                    .await
                    .unwrap();
                send.await.unwrap();
                buf
            });
            assert_eq!(got, b"console bytes");
        }
    }
}
