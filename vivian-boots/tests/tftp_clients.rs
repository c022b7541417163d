//! The TFTP server against real TFTP clients (tftp-hpa, curl, atftp,
//! busybox) in network namespaces: byte-identical downloads with and
//! without options, refusals of traversal and writes.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use vivian_boots::{Boots, BootsConfig, NetworkSource, SocketSource, Subnet};
use vivian_core::netboot::{BootEvent, BootEventKind, KnownDut, StaticDuts};

const SIZES: &[(&str, usize)] = &[
    ("empty.bin", 0),
    ("exact512.bin", 512),
    ("one_mib.bin", 1 << 20),
    ("forty_mib.bin", 40 << 20),
];

struct Env {
    _rt: tokio::runtime::Runtime,
    pair: VethPair,
    _boots: Boots,
    root: tempfile::TempDir,
    out: tempfile::TempDir,
    events: Arc<Mutex<Vec<BootEvent>>>,
}

fn start(octet: u8, big: bool) -> Env {
    logs();
    let pair = VethPair::new("t", octet);
    pair.cli
        .ip(&["addr", "add", &format!("10.98.{octet}.77/24"), "dev", "v1"]);
    let root = tempfile::tempdir().unwrap();
    for (i, (name, len)) in SIZES.iter().enumerate() {
        if big || *len <= 1 << 20 {
            std::fs::write(root.path().join(name), content(*len, i as u64 + 1)).unwrap();
        }
    }
    std::fs::create_dir(root.path().join("sub")).unwrap();
    std::fs::write(root.path().join("sub/inner.bin"), b"inner").unwrap();
    let secret = root
        .path()
        .parent()
        .unwrap()
        .join(format!("vivian-boots-secret-{}", std::process::id()));
    std::fs::write(&secret, b"secret").unwrap();
    std::os::unix::fs::symlink(&secret, root.path().join("escape")).unwrap();
    let cfg = BootsConfig::new("v0", root.path(), "http://ci-gateway");
    let sock = pair.srv.enter(|| {
        vivian_boots::iface::bind_udp(
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, 69)),
            Some("v0"),
            false,
        )
        .unwrap()
    });
    let events = Arc::new(Mutex::new(Vec::new()));
    let ev2 = events.clone();
    let rt = runtime();
    let guard = rt.enter();
    let boots = Boots::start_with(
        &cfg,
        SocketSource::Disabled,
        SocketSource::Given(sock),
        NetworkSource::Fixed(Subnet {
            server_ip: Ipv4Addr::new(10, 98, octet, 1),
            netmask: Ipv4Addr::new(255, 255, 255, 0),
        }),
        Arc::new(StaticDuts(vec![KnownDut {
            id: "dut-t".into(),
            mac: "52:54:00:00:00:77".parse().unwrap(),
            ip: Some(Ipv4Addr::new(10, 98, octet, 77)),
        }])),
        Arc::new(move |e: BootEvent| ev2.lock().unwrap().push(e)),
    )
    .unwrap();
    drop(guard);
    Env {
        _rt: rt,
        pair,
        _boots: boots,
        root,
        out: tempfile::tempdir().unwrap(),
        events,
    }
}

impl Env {
    fn server(&self) -> String {
        format!("{}.1", self.pair.prefix)
    }

    /// Runs a client; returns whether it succeeded.
    fn client(&self, args: &[&str]) -> bool {
        let t = std::time::Instant::now();
        let o = self.pair.cli.run(args, Duration::from_secs(60));
        eprintln!("{:?}: {}", t.elapsed(), args.join(" "));
        if !o.status.success() {
            eprintln!(
                "{} failed: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        o.status.success()
    }

    fn assert_same(&self, name: &str, local: &Path, what: &str) {
        // tftp-hpa exits 0 even when the server refuses: compare contents.
        let want = std::fs::read(self.root.path().join(name)).unwrap();
        let got = std::fs::read(local).unwrap_or_else(|e| panic!("{what}: no output: {e}"));
        assert_eq!(got.len(), want.len(), "{what}: size of {name}");
        assert!(got == want, "{what}: content of {name} differs");
        std::fs::remove_file(local).unwrap();
    }

    fn out(&self, tag: &str) -> std::path::PathBuf {
        self.out.path().join(tag)
    }
}

#[test]
fn real_clients_download_byte_identical_files() {
    for (p, pkg) in [
        ("tftp", "tftp-hpa"),
        ("curl", "curl"),
        ("atftp", "atftp"),
        ("busybox", "busybox"),
    ] {
        require(p, pkg);
    }
    let env = start(21, true);
    let srv = env.server();
    let srv = srv.as_str();
    let env = &env;

    std::thread::scope(|scope| {
        // 40 MiB, concurrently (lock-step TFTP is latency-bound): tftp-hpa
        // has no options, so 512-byte blocks: 81920 of them, the block
        // number wraps past 65535; curl with blksize 1468 and tsize; atftp
        // with blksize and windowsize 16 (RFC 7440).
        let big = [
            scope.spawn(move || {
                let o = env.out("hpa40");
                assert!(env.client(&[
                    "tftp",
                    "-m",
                    "binary",
                    srv,
                    "-c",
                    "get",
                    "forty_mib.bin",
                    o.to_str().unwrap()
                ]));
                env.assert_same("forty_mib.bin", &o, "tftp-hpa 40 MiB");
            }),
            scope.spawn(move || {
                let o = env.out("curl40");
                assert!(env.client(&[
                    "curl",
                    "-sS",
                    "--max-time",
                    "50",
                    "--tftp-blksize",
                    "1468",
                    "-o",
                    o.to_str().unwrap(),
                    &format!("tftp://{srv}/forty_mib.bin")
                ]));
                env.assert_same("forty_mib.bin", &o, "curl 40 MiB");
            }),
            scope.spawn(move || {
                let o = env.out("atftp40");
                assert!(env.client(&[
                    "atftp",
                    "--option",
                    "blksize 1468",
                    "--option",
                    "windowsize 16",
                    "-g",
                    "-r",
                    "forty_mib.bin",
                    "-l",
                    o.to_str().unwrap(),
                    srv
                ]));
                env.assert_same("forty_mib.bin", &o, "atftp 40 MiB windowsize 16");
            }),
        ];

        for (name, len) in &SIZES[..3] {
            let o = env.out("hpa");
            assert!(env.client(&[
                "tftp",
                "-m",
                "binary",
                srv,
                "-c",
                "get",
                name,
                o.to_str().unwrap()
            ]));
            env.assert_same(name, &o, "tftp-hpa");

            // curl: tsize (always) with the default and a larger block size.
            // curl 7.88 fails on empty files ("getpeername() failed", also
            // against tftpd-hpa): the other clients cover the 0-byte file.
            let variants: &[&[&str]] = if *len == 0 {
                &[]
            } else {
                &[&[], &["--tftp-blksize", "1468"], &["--tftp-no-options"]]
            };
            for extra in variants {
                let o = env.out("curl");
                let url = format!("tftp://{srv}/{name}");
                let mut args = vec!["curl", "-sS", "--max-time", "30", "-o", o.to_str().unwrap()];
                args.extend_from_slice(extra);
                args.push(&url);
                assert!(env.client(&args), "curl {extra:?}");
                env.assert_same(name, &o, &format!("curl {extra:?}"));
            }
            // atftp: blksize + tsize + windowsize (RFC 7440).
            let o = env.out("atftp");
            assert!(env.client(&[
                "atftp",
                "--option",
                "blksize 1468",
                "--option",
                "tsize 0",
                "--option",
                "windowsize 16",
                "-g",
                "-r",
                name,
                "-l",
                o.to_str().unwrap(),
                srv
            ]));
            env.assert_same(name, &o, "atftp windowsize");
            // busybox tftp with blksize.
            let o = env.out("bb");
            assert!(env.client(&[
                "busybox",
                "tftp",
                "-b",
                "1468",
                "-g",
                "-r",
                name,
                "-l",
                o.to_str().unwrap(),
                srv
            ]));
            env.assert_same(name, &o, "busybox");
        }
        for b in big {
            b.join().expect("40 MiB download");
        }
    });

    // Subdirectories work.
    let o = env.out("sub");
    assert!(env.client(&[
        "curl",
        "-sS",
        "-o",
        o.to_str().unwrap(),
        &format!("tftp://{srv}/sub/inner.bin")
    ]));
    assert_eq!(std::fs::read(&o).unwrap(), b"inner");

    // Every transfer of the known DUT's address is in its timeline.
    let ev = env.events.lock().unwrap();
    assert!(ev.len() >= 19, "{} events", ev.len());
    assert!(ev.iter().all(|e| e.dut_id.as_deref() == Some("dut-t")));
    assert!(ev.iter().any(|e| matches!(&e.kind,
        BootEventKind::Tftp { filename, bytes_sent: Some(n), error: None, .. }
            if filename == "forty_mib.bin" && *n == 40 << 20)));
}

#[test]
fn traversal_missing_files_and_writes_are_refused() {
    require("curl", "curl");
    require("tftp", "tftp-hpa");
    let env = start(22, false);
    let srv = env.server();
    for bad in [
        "../vivian-boots-secret",
        "sub/../../etc/passwd",
        "/etc/passwd",
        "//etc/passwd",
        "escape",
        "missing.bin",
        "sub",
    ] {
        let o = env.out("bad");
        let ok = env.client(&[
            "tftp",
            "-m",
            "binary",
            &srv,
            "-c",
            "get",
            bad,
            o.to_str().unwrap(),
        ]);
        // tftp-hpa exits 0 even on errors; what matters is what it got.
        let got = std::fs::read(&o).unwrap_or_default();
        assert!(
            got.is_empty(),
            "{bad}: got {} bytes (exit ok: {ok})",
            got.len()
        );
        let _ = std::fs::remove_file(&o);
        assert!(
            !env.client(&[
                "curl",
                "-sS",
                "--max-time",
                "10",
                "-o",
                o.to_str().unwrap(),
                &format!("tftp://{srv}/{bad}")
            ]),
            "curl fetched {bad}"
        );
    }
    // Uploads are refused and nothing is written.
    let src = env.out("upload");
    std::fs::write(&src, b"data").unwrap();
    assert!(!env.client(&[
        "curl",
        "-sS",
        "--max-time",
        "10",
        "-T",
        src.to_str().unwrap(),
        &format!("tftp://{srv}/uploaded.bin")
    ]));
    assert!(!env.root.path().join("uploaded.bin").exists());
    // Refusals of the known DUT are recorded with their reason.
    let ev = env.events.lock().unwrap();
    assert!(ev.iter().any(|e| matches!(&e.kind,
        BootEventKind::Tftp { filename, error: Some(err), .. }
            if filename == "escape" && err == "File not found")));
}
