use super::*;

#[test]
fn confinement_to_the_root() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::fs::write(root.join("sub/ok.bin"), b"hello").unwrap();
    std::fs::write(dir.path().join("secret"), b"no").unwrap();
    std::os::unix::fs::symlink(dir.path().join("secret"), root.join("out")).unwrap();
    std::os::unix::fs::symlink("sub/ok.bin", root.join("in")).unwrap();
    let fifo = root.join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let root = root.canonicalize().unwrap();

    for ok in ["sub/ok.bin", "/sub/ok.bin", "./sub//ok.bin", "in"] {
        let (_, size) = open_in_root(&root, ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        assert_eq!(size, 5, "{ok}");
    }
    for bad in [
        "../secret",
        "sub/../../secret",
        "sub/../sub/ok.bin",
        "out",
        "missing",
        "sub",
        "",
        "/",
        "fifo",
        "/dev/null",
    ] {
        assert_eq!(
            open_in_root(&root, bad).err(),
            Some(Refusal::NotFound),
            "{bad}"
        );
    }
}

#[test]
fn option_negotiation() {
    let o = |v: &[(&str, &str)]| -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    };
    let t = Duration::from_secs(1);
    let (n, ack) = negotiate(&[], 10, t);
    assert_eq!((n.blksize, n.windowsize, n.oack), (512, 1, false));
    assert!(ack.is_empty());
    let (n, ack) = negotiate(
        &o(&[
            ("blksize", "1468"),
            ("tsize", "0"),
            ("windowsize", "16"),
            ("timeout", "3"),
        ]),
        1234,
        t,
    );
    assert_eq!(
        (n.blksize, n.windowsize, n.timeout),
        (1468, 16, Duration::from_secs(3))
    );
    assert_eq!(
        ack,
        vec![
            ("blksize", "1468".to_string()),
            ("tsize", "1234".to_string()),
            ("windowsize", "16".to_string()),
            ("timeout", "3".to_string())
        ]
    );
    // Out of range or malformed values are clamped or ignored.
    let (n, ack) = negotiate(
        &o(&[
            ("blksize", "100000"),
            ("windowsize", "0"),
            ("timeout", "x"),
            ("foo", "1"),
        ]),
        0,
        t,
    );
    assert_eq!((n.blksize, n.windowsize, n.timeout), (MAX_BLKSIZE, 1, t));
    assert_eq!(ack, vec![("blksize", MAX_BLKSIZE.to_string())]);
    let (n, ack) = negotiate(&o(&[("blksize", "4")]), 0, t);
    assert_eq!((n.blksize, n.oack), (512, false));
    assert!(ack.is_empty());
}

/// A minimal client on loopback, to test what the real clients cannot
/// show: windows, rollover timing, retransmission and duplicate ACKs.
struct Client {
    sock: std::net::UdpSocket,
    server: SocketAddr,
}

impl Client {
    fn new(server: SocketAddr) -> Client {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        Client { sock, server }
    }

    fn rrq(&self, name: &str, opts: &[(&str, &str)]) {
        let mut p = vec![0, 1];
        p.extend_from_slice(name.as_bytes());
        p.extend_from_slice(b"\0octet\0");
        for (k, v) in opts {
            p.extend_from_slice(k.as_bytes());
            p.push(0);
            p.extend_from_slice(v.as_bytes());
            p.push(0);
        }
        self.sock.send_to(&p, self.server).unwrap();
    }

    fn recv(&self) -> (Vec<u8>, SocketAddr) {
        let mut b = vec![0u8; 70000];
        let (n, from) = self.sock.recv_from(&mut b).unwrap();
        b.truncate(n);
        (b, from)
    }

    fn ack(&self, to: SocketAddr, block: u16) {
        let mut p = vec![0, 4];
        p.extend_from_slice(&block.to_be_bytes());
        self.sock.send_to(&p, to).unwrap();
    }
}

async fn server(root: &Path) -> (SocketAddr, tokio::task::JoinHandle<()>, TftpStop) {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    let mut cfg = TftpConfig::new(root);
    cfg.timeout = Duration::from_millis(200);
    cfg.retries = 3;
    let s = TftpServer::new(
        cfg,
        sock,
        Arc::new(|_| None),
        vivian_core::netboot::discard_events(),
    )
    .unwrap();
    let stop = s.stopper();
    (addr, tokio::spawn(s.run()), stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windowed_transfer_with_loss_and_rollover() {
    let dir = tempfile::tempdir().unwrap();
    // 70000 blocks of 8 bytes: the block number wraps past 65535.
    let data: Vec<u8> = (0..70_000u32 * 8).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(dir.path().join("f"), &data).unwrap();
    let (addr, task, stop) = server(dir.path()).await;
    let got = tokio::task::spawn_blocking(move || {
        let c = Client::new(addr);
        c.rrq(
            "f",
            &[("blksize", "8"), ("windowsize", "4"), ("tsize", "0")],
        );
        let (oack, tid) = c.recv();
        assert_eq!(oack[..2], [0, 6]);
        assert!(oack.windows(12).any(|w| w == b"tsize\x00560000"));
        assert_ne!(tid.port(), addr.port(), "a transfer uses its own port");
        c.ack(tid, 0);
        let mut out = Vec::new();
        let mut expected: u16 = 1;
        let mut dropped_once = false;
        let mut in_window = 0;
        loop {
            let (p, _) = c.recv();
            assert_eq!(p[..2], [0, 3]);
            let block = u16::from_be_bytes([p[2], p[3]]);
            // Lose block 10 once: the client re-ACKs 9 after the window.
            if block == 10 && !dropped_once {
                dropped_once = true;
                continue;
            }
            if block != expected {
                // Out of order after the loss: ACK what we have, as RFC 7440 says.
                c.ack(tid, expected.wrapping_sub(1));
                in_window = 0;
                continue;
            }
            out.extend_from_slice(&p[4..]);
            expected = expected.wrapping_add(1);
            in_window += 1;
            let last = p.len() < 4 + 8;
            if in_window == 4 || last {
                c.ack(tid, block);
                in_window = 0;
            }
            if last {
                break;
            }
        }
        assert!(dropped_once);
        out
    })
    .await
    .unwrap();
    assert_eq!(got.len(), data.len());
    assert!(got == data);
    stop.stop();
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retransmits_on_timeout_and_ignores_duplicate_acks() {
    let dir = tempfile::tempdir().unwrap();
    let data = vec![7u8; 1024]; // exactly two blocks: a final empty one follows
    std::fs::write(dir.path().join("f"), &data).unwrap();
    let (addr, task, stop) = server(dir.path()).await;
    tokio::task::spawn_blocking(move || {
        let c = Client::new(addr);
        c.rrq("f", &[]);
        let (p1, tid) = c.recv();
        assert_eq!(p1[..4], [0, 3, 0, 1]);
        // Say nothing: block 1 comes again after the timeout.
        let (again, _) = c.recv();
        assert_eq!(again, p1);
        c.ack(tid, 1);
        let (p2, _) = c.recv();
        assert_eq!(p2[..4], [0, 3, 0, 2]);
        assert_eq!(p2.len(), 516);
        // A duplicate ACK of 1 does not trigger a resend of 2.
        c.ack(tid, 1);
        c.ack(tid, 2);
        let (p3, _) = c.recv();
        assert_eq!(p3, [0, 3, 0, 3], "final empty block");
        c.ack(tid, 3);
        c.sock
            .set_read_timeout(Some(Duration::from_millis(400)))
            .unwrap();
        let mut b = [0u8; 600];
        assert!(
            c.sock.recv_from(&mut b).is_err(),
            "nothing after the last ACK"
        );
    })
    .await
    .unwrap();
    stop.stop();
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), b"x").unwrap();
    let (addr, task, stop) = server(dir.path()).await;
    tokio::task::spawn_blocking(move || {
        let c = Client::new(addr);
        let mut w = vec![0, 2];
        w.extend_from_slice(b"f\0octet\0");
        c.sock.send_to(&w, addr).unwrap();
        let (p, _) = c.recv();
        assert_eq!(p, packet::error(4, "Write support not implemented"));
        c.rrq("../etc/passwd", &[]);
        assert_eq!(c.recv().0, packet::error(1, "File not found"));
        let mut n = vec![0, 1];
        n.extend_from_slice(b"f\0netascii\0");
        c.sock.send_to(&n, addr).unwrap();
        assert_eq!(
            c.recv().0,
            packet::error(5, "Mode 'netascii' not supported")
        );
        // Garbage is dropped silently and the server still answers.
        c.sock.send_to(&[0xff; 3], addr).unwrap();
        c.sock.send_to(&[], addr).unwrap();
        c.rrq("f", &[]);
        assert_eq!(c.recv().0, [0, 3, 0, 1, b'x']);
    })
    .await
    .unwrap();
    stop.stop();
    task.abort();
}
