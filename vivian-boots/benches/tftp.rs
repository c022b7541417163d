//! TFTP throughput: our server against tftpd-hpa (`in.tftpd`) on loopback,
//! a 100 MiB file fetched by a real client (atftp) with blksize 1468, with
//! and without windowsize 16 (tftpd-hpa ignores windowsize and stays
//! lock-step). Prints MB/s (1 MB = 10^6 bytes), best of 3 runs, and the
//! CPU time each server spent per transfer (getrusage for ours, which runs
//! in this process; /proc/<pid>/stat with its reaped children for
//! tftpd-hpa, which forks per transfer), least of 3: on a machine shared
//! with other work the wall clock depends on the load, the CPU time much
//! less.
//!
//! `cargo bench -p vivian-boots --bench tftp` (needs tftpd-hpa and atftp).

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::{SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{content, proc_cpu, require, runtime, rusage_cpu, KillOnDrop};
use vivian_boots::{TftpConfig, TftpServer};

const SIZE: usize = 100 << 20;

fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Fetches the file with atftp; returns MB/s.
fn fetch(port: u16, window: Option<u32>, out: &std::path::Path) -> f64 {
    let _ = std::fs::remove_file(out);
    let mut args = vec![
        "--option".to_string(),
        "blksize 1468".to_string(),
        "--option".to_string(),
        "tsize 0".to_string(),
    ];
    if let Some(w) = window {
        args.push("--option".into());
        args.push(format!("windowsize {w}"));
    }
    args.extend([
        "-g".into(),
        "-r".into(),
        "big.bin".into(),
        "-l".into(),
        out.display().to_string(),
        "127.0.0.1".into(),
        port.to_string(),
    ]);
    let t = Instant::now();
    let st = Command::new("timeout")
        .arg("120")
        .arg("atftp")
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    let secs = t.elapsed().as_secs_f64();
    assert!(st.success(), "atftp failed on port {port}");
    let got = std::fs::metadata(out).unwrap().len();
    assert_eq!(got as usize, SIZE, "short download");
    SIZE as f64 / secs / 1e6
}

/// A minimal blocking client (data discarded) to measure the servers
/// without a C client's per-block file writes; returns MB/s.
fn fetch_raw(port: u16, window: u16) -> f64 {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut rrq = b"\0\x01big.bin\0octet\0blksize\x001468\0".to_vec();
    if window > 1 {
        rrq.extend_from_slice(format!("windowsize\0{window}\0").as_bytes());
    }
    let t = Instant::now();
    sock.send_to(&rrq, ("127.0.0.1", port)).unwrap();
    let mut buf = vec![0u8; 2048];
    let mut peer = None;
    let mut expected: u16 = 1;
    let mut total = 0usize;
    let mut in_window = 0u16;
    // The server may ignore windowsize (tftpd-hpa): then ACK every block.
    let mut window_used = 1u16;
    loop {
        let (n, from) = match sock.recv_from(&mut buf) {
            Ok(x) => x,
            Err(_) => {
                // Timeout: re-ACK the last block received in order.
                if let Some(p) = peer {
                    let mut ack = vec![0, 4];
                    ack.extend_from_slice(&expected.wrapping_sub(1).to_be_bytes());
                    sock.send_to(&ack, p).unwrap();
                    in_window = 0;
                }
                continue;
            }
        };
        peer = Some(from);
        let op = u16::from_be_bytes([buf[0], buf[1]]);
        if op == 6 {
            let text = String::from_utf8_lossy(&buf[2..n]).to_string();
            if text.contains("windowsize") {
                window_used = window;
            }
            sock.send_to(&[0, 4, 0, 0], from).unwrap();
            continue;
        }
        assert_eq!(op, 3, "unexpected opcode {op}");
        let block = u16::from_be_bytes([buf[2], buf[3]]);
        if block != expected {
            continue;
        }
        total += n - 4;
        expected = expected.wrapping_add(1);
        in_window += 1;
        let last = n - 4 < 1468;
        if last || in_window >= window_used {
            let mut ack = vec![0, 4];
            ack.extend_from_slice(&block.to_be_bytes());
            sock.send_to(&ack, from).unwrap();
            in_window = 0;
        }
        if last {
            break;
        }
    }
    assert_eq!(total, SIZE);
    SIZE as f64 / t.elapsed().as_secs_f64() / 1e6
}

/// The loopback floor, no TFTP and no file: a sender thread sends
/// 1472-byte datagrams (a 1468-byte block and its header) to a receiver
/// that answers a 4-byte "ACK" every `window` datagrams, for 100 MiB.
/// With `window` 1 this is the kernel's lock-step round trip; returns MB/s.
fn loopback_floor(window: usize) -> f64 {
    let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
    let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
    tx.connect(rx.local_addr().unwrap()).unwrap();
    rx.connect(tx.local_addr().unwrap()).unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    tx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let packets = SIZE / 1468;
    let receiver = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        for i in 1..=packets {
            rx.recv(&mut buf).expect("floor: datagram lost");
            if i % window == 0 || i == packets {
                rx.send(&[0, 4, 0, 0]).unwrap();
            }
        }
    });
    let pkt = [0u8; 1472];
    let mut ack = [0u8; 16];
    let t = Instant::now();
    let mut sent = 0;
    while sent < packets {
        let n = window.min(packets - sent);
        for _ in 0..n {
            tx.send(&pkt).unwrap();
        }
        sent += n;
        tx.recv(&mut ack).expect("floor: ACK lost");
    }
    let secs = t.elapsed().as_secs_f64();
    receiver.join().unwrap();
    (packets * 1468) as f64 / secs / 1e6
}

/// Where the server under test runs, to read its CPU time.
#[derive(Clone, Copy)]
enum Server {
    /// In this process: all threads but the calling one (the in-process
    /// client, if any, runs there).
    InProcess,
    /// Another process (and the children it reaps).
    Pid(u32),
}

impl Server {
    fn cpu(self) -> Duration {
        match self {
            Server::InProcess => {
                rusage_cpu(libc::RUSAGE_SELF).saturating_sub(rusage_cpu(libc::RUSAGE_THREAD))
            }
            Server::Pid(p) => proc_cpu(p),
        }
    }
}

/// Best MB/s and least server CPU time per transfer, over `n` runs.
fn best_of(n: usize, server: Server, mut f: impl FnMut() -> f64) -> (f64, Duration) {
    let mut best = 0.0f64;
    let mut cpu = Duration::MAX;
    for _ in 0..n {
        let before = server.cpu();
        best = best.max(f());
        // tftpd-hpa's transfer child is reaped (and counted) just after.
        std::thread::sleep(Duration::from_millis(50));
        cpu = cpu.min(server.cpu().saturating_sub(before));
    }
    (best, cpu)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// tftpd-hpa's transfer children are reaped without their times being
/// added to the parent's (SIGCHLD ignored): a zero reading means "not
/// measured", not "free".
fn hpa_cpu(d: Duration) -> String {
    if d.is_zero() {
        "    n/a".into()
    } else {
        format!("{:7.0} ms", ms(d))
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    require("in.tftpd", "tftpd-hpa");
    require("atftp", "atftp");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("big.bin"), content(SIZE, 3)).unwrap();
    let out = dir.path().join("out.bin");

    // tftpd-hpa, foreground, on its own port.
    let hpa_port = free_port();
    let _hpa = KillOnDrop(
        Command::new("in.tftpd")
            .args([
                "-L",
                "-a",
                &format!("127.0.0.1:{hpa_port}"),
                "-s",
                dir.path().to_str().unwrap(),
                "-B",
                "1468",
            ])
            .spawn()
            .expect("start in.tftpd"),
    );

    // Ours, in this process.
    let rt = runtime();
    let ours_port = {
        let _g = rt.enter();
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = sock.local_addr().unwrap().port();
        sock.set_nonblocking(true).unwrap();
        let sock = tokio::net::UdpSocket::from_std(sock).unwrap();
        let server = TftpServer::new(
            TftpConfig::new(dir.path()),
            sock,
            Arc::new(|_| None),
            vivian_core::netboot::discard_events(),
        )
        .unwrap();
        rt.spawn(server.run());
        port
    };
    std::thread::sleep(Duration::from_millis(300));
    let _: SocketAddr = format!("127.0.0.1:{ours_port}").parse().unwrap();

    let hpa_srv = Server::Pid(_hpa.0.id());
    let ours_srv = Server::InProcess;
    let (hpa, hpa_c) = best_of(3, hpa_srv, || fetch(hpa_port, None, &out));
    let (ours, ours_c) = best_of(3, ours_srv, || fetch(ours_port, None, &out));
    let (hpa_w, hpa_wc) = best_of(3, hpa_srv, || fetch(hpa_port, Some(16), &out));
    let (ours_w, ours_wc) = best_of(3, ours_srv, || fetch(ours_port, Some(16), &out));
    let (raw_hpa, raw_hpa_c) = best_of(3, hpa_srv, || fetch_raw(hpa_port, 1));
    let (raw_ours, raw_ours_c) = best_of(3, ours_srv, || fetch_raw(ours_port, 1));
    let (raw_ours_w, raw_ours_wc) = best_of(3, ours_srv, || fetch_raw(ours_port, 16));
    println!(
        "TFTP 100 MiB on loopback, client atftp, blksize 1468; best MB/s of 3, \
         least server CPU time per transfer of 3:"
    );
    println!(
        "  tftpd-hpa  lock-step           : {hpa:8.1} MB/s  server CPU {}",
        hpa_cpu(hpa_c)
    );
    println!(
        "  vivian     lock-step           : {ours:8.1} MB/s  server CPU {:7.0} ms  ({:.2}x MB/s)",
        ms(ours_c),
        ours / hpa
    );
    println!(
        "  tftpd-hpa  windowsize 16 asked : {hpa_w:8.1} MB/s  server CPU {} (option ignored)",
        hpa_cpu(hpa_wc)
    );
    println!(
        "  vivian     windowsize 16       : {ours_w:8.1} MB/s  server CPU {:7.0} ms  ({:.2}x tftpd-hpa MB/s)",
        ms(ours_wc),
        ours_w / hpa_w.max(hpa)
    );
    let floor1 = (0..3).map(|_| loopback_floor(1)).fold(0.0, f64::max);
    let floor16 = (0..3).map(|_| loopback_floor(16)).fold(0.0, f64::max);
    println!("Same with a minimal in-process client (no file writes):");
    println!(
        "  tftpd-hpa  lock-step           : {raw_hpa:8.1} MB/s  server CPU {}",
        hpa_cpu(raw_hpa_c)
    );
    println!(
        "  vivian     lock-step           : {raw_ours:8.1} MB/s  server CPU {:7.0} ms  ({:.2}x MB/s)",
        ms(raw_ours_c),
        raw_ours / raw_hpa
    );
    println!(
        "  vivian     windowsize 16       : {raw_ours_w:8.1} MB/s  server CPU {:7.0} ms  ({:.2}x tftpd-hpa MB/s)",
        ms(raw_ours_wc),
        raw_ours_w / raw_hpa
    );
    println!("Loopback floor (two threads, 1472-byte datagrams, no TFTP, no file), best of 3:");
    println!("  lock-step                      : {floor1:8.1} MB/s");
    println!("  an ACK every 16 datagrams      : {floor16:8.1} MB/s");
}
