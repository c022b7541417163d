//! The U-Boot path (IN B.7) with the real client: QEMU's `virt` arm64
//! machine running Debian's U-Boot (`u-boot-qemu`, `qemu_arm64`), in a
//! network namespace with a tap device. U-Boot's own DHCP client gets its
//! lease and the `boot.scr` name from our DHCP server (it sends option 93 =
//! 0x16), its TFTP client downloads the generated script image, `source`
//! runs it, and the script downloads the kernel and the initrd over TFTP,
//! which our TFTP server fetches from the boot configuration's HTTP URLs.
//! The "kernel" is not one, so `booti` refuses it; the test then reads
//! `bootargs` back from U-Boot to check the command line survived quoting.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{ChildStdin, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vivian_boots::{Boots, BootsConfig, NetworkSource, SocketSource};
use vivian_core::config::BootDefaults;
use vivian_core::netboot::{
    BootEvent, BootEventKind, DefaultNetboot, KnownDut, NoDeployments, StaticDuts,
};

/// U-Boot 2023.01's virtio-net driver uses this address whatever QEMU's
/// `mac=` says; QEMU is given the same one.
const MAC: &str = "52:52:52:52:52:52";
const UBOOT_BIN: &str = "/usr/lib/u-boot/qemu_arm64/u-boot.bin";
/// A command line with everything U-Boot's shell could misread.
const CMDLINE: &str = "console=ttyAMA0 b2c.container=\"-ti docker://x\" a;b it's ${x}";

/// Serves fixed files over HTTP/1.1 and records the paths asked for.
async fn http_files(
    listener: std::net::TcpListener,
    files: Arc<HashMap<String, Vec<u8>>>,
    log: Arc<Mutex<Vec<String>>>,
) {
    listener.set_nonblocking(true).unwrap();
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        let files = files.clone();
        let log = log.clone();
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
                match conn.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let head = String::from_utf8_lossy(&buf).into_owned();
            let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
            log.lock().unwrap().push(path.clone());
            let (status, body) = match files.get(&path) {
                Some(b) => ("200 OK", b.clone()),
                None => ("404 Not Found", Vec::new()),
            };
            let _ = conn
                .write_all(
                    format!(
                        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    )
                    .as_bytes(),
                )
                .await;
            let _ = conn.write_all(&body).await;
        });
    }
}

/// QEMU's serial console: output collected by a thread, input written.
struct Console {
    text: Arc<Mutex<String>>,
    input: ChildStdin,
}

impl Console {
    fn text(&self) -> String {
        self.text.lock().unwrap().clone()
    }

    /// Waits (bounded) until the console output after byte `from` contains
    /// `pattern`; returns the position just after it.
    fn wait_for(&mut self, from: usize, pattern: &str, limit: Duration, poke: bool) -> usize {
        let deadline = Instant::now() + limit;
        loop {
            let t = self.text();
            if let Some(i) = t.get(from..).and_then(|s| s.find(pattern)) {
                return from + i + pattern.len();
            }
            assert!(
                Instant::now() < deadline,
                "U-Boot did not print {pattern:?} within {limit:?}; console:\n{t}"
            );
            if poke {
                // Any key stops the autoboot countdown.
                let _ = self.input.write_all(b" ");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn send(&mut self, line: &str) {
        self.input.write_all(line.as_bytes()).unwrap();
        self.input.write_all(b"\n").unwrap();
        self.input.flush().unwrap();
    }
}

#[test]
fn qemu_uboot_boots_our_script_and_fetches_kernel_and_initrd_over_tftp() {
    require("qemu-system-aarch64", "qemu-system-arm");
    assert!(
        std::path::Path::new(UBOOT_BIN).exists(),
        "{UBOOT_BIN} is missing: install the Debian package `u-boot-qemu`"
    );
    logs();
    let ns = Netns::new("u");
    ns.ip(&["tuntap", "add", "dev", "tap0", "mode", "tap"]);
    ns.ip(&["addr", "add", "10.98.41.1/24", "dev", "tap0"]);
    ns.ip(&["link", "set", "tap0", "up"]);

    // The HTTP server of the artifacts is outside the namespace: the TFTP
    // server downloads them from the executor's side, not the DUTs'.
    let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (dhcp_sock, tftp_sock, net) = ns.enter(|| {
        let d = vivian_boots::iface::bind_udp(
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, 67)),
            Some("tap0"),
            true,
        )
        .unwrap();
        let t = vivian_boots::iface::bind_udp(
            SocketAddr::from((Ipv4Addr::new(10, 98, 41, 1), 69)),
            None,
            false,
        )
        .unwrap();
        (d, t, vivian_boots::iface::interface_subnet("tap0").unwrap())
    });
    let base = format!("http://{}", http.local_addr().unwrap());
    let kernel = content(300_000, 7);
    let initrd = content(70_001, 8);
    let files = Arc::new(HashMap::from([
        ("/arm64/kernel".to_string(), kernel.clone()),
        ("/arm64/initrd".to_string(), initrd.clone()),
    ]));
    let rt = runtime();
    let http_log = Arc::new(Mutex::new(Vec::new()));
    rt.spawn(http_files(http, files, http_log.clone()));

    let root = tempfile::tempdir().unwrap();
    let events = Arc::new(Mutex::new(Vec::new()));
    let ev2 = events.clone();
    let cfg = BootsConfig::new("tap0", root.path(), "http://unused");
    let boots = {
        let _g = rt.enter();
        Boots::start_with(
            &cfg,
            SocketSource::Given(dhcp_sock),
            SocketSource::Given(tftp_sock),
            NetworkSource::Fixed(net),
            Arc::new(StaticDuts(vec![KnownDut {
                id: MAC.into(),
                mac: MAC.parse().unwrap(),
                ip: Some(Ipv4Addr::new(10, 98, 41, 60)),
            }])),
            Arc::new(move |e: BootEvent| ev2.lock().unwrap().push(e)),
        )
        .unwrap()
    };
    // The U-Boot defaults (bootloader uboot, platform uboot, arch ARM64)
    // are more specific than the iPXE ones, which must not be used.
    boots.set_netboot(Arc::new(DefaultNetboot::new(
        BootDefaults::from_vars([
            ("BOOTS_DEFAULT_KERNEL", format!("{base}/wrong-kernel")),
            (
                "BOOTS_DEFAULT_UBOOT_ARM64_KERNEL",
                format!("{base}/arm64/kernel"),
            ),
            (
                "BOOTS_DEFAULT_ARM64_UBOOT_INITRD",
                format!("{base}/arm64/initrd"),
            ),
            (
                "BOOTS_DEFAULT_IPXE_ARM64_INITRD",
                format!("{base}/wrong-initrd"),
            ),
            ("BOOTS_DEFAULT_CMDLINE", CMDLINE.to_string()),
        ]),
        Arc::new(NoDeployments),
    )));

    let started = Instant::now();
    let mut qemu = KillOnDrop(
        ns.command("qemu-system-aarch64")
            .args([
                "-M",
                "virt",
                "-cpu",
                "cortex-a57",
                "-m",
                "512",
                "-accel",
                "tcg",
                "-nographic",
                "-no-reboot",
                "-bios",
                UBOOT_BIN,
                "-netdev",
                "tap,id=n0,ifname=tap0,script=no,downscript=no",
                "-device",
                &format!("virtio-net-pci,netdev=n0,mac={MAC}"),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start qemu-system-aarch64"),
    );
    let text = Arc::new(Mutex::new(String::new()));
    let mut stdout = qemu.0.stdout.take().unwrap();
    let t2 = text.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            t2.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let mut console = Console {
        text,
        input: qemu.0.stdin.take().unwrap(),
    };

    // Stop the autoboot (the board's distro boot would look for its own
    // script name), then boot the way a farm's U-Boot environment does:
    // DHCP (which downloads the boot file), then run it.
    let at = console.wait_for(0, "=>", Duration::from_secs(60), true);
    console.send("dhcp && source ${fileaddr}");
    let at = console.wait_for(
        at,
        "Bad Linux ARM64 Image magic",
        Duration::from_secs(60),
        false,
    );
    let at = console.wait_for(at, "=>", Duration::from_secs(20), false);
    console.send("printenv bootargs");
    let at = console.wait_for(at, "bootargs=", Duration::from_secs(10), false);
    console.wait_for(at, "\n", Duration::from_secs(10), false);
    let elapsed = started.elapsed();
    let out = console.text();
    drop(console);
    drop(qemu);
    reader.join().unwrap();
    let _ = writeln!(std::io::stderr(), "U-Boot netboot to booti: {elapsed:?}");

    // The script ran: our banner, the right files, the command line intact.
    assert!(out.contains(&format!("Vivian: booting {MAC}")), "{out}");
    assert!(
        out.contains(&format!(
            "Filename '/dyn/bootloader/u-boot/ARM64/{MAC}/boot.scr'"
        )),
        "U-Boot did not get the boot script name from DHCP:\n{out}"
    );
    let bootargs = out
        .split("bootargs=")
        .last()
        .and_then(|s| s.lines().next())
        .unwrap_or_default()
        .trim_end_matches('\r');
    assert_eq!(bootargs, CMDLINE, "{out}");
    let http = http_log.lock().unwrap().clone();
    assert_eq!(http, vec!["/arm64/kernel", "/arm64/initrd"], "{out}");

    // Every TFTP download completed in full and is in the DUT's timeline.
    let ev = events.lock().unwrap();
    let sent = |file: &str| {
        ev.iter().find_map(|e| match &e.kind {
            BootEventKind::Tftp {
                filename,
                bytes_sent: Some(n),
                ..
            } if filename == &format!("/dyn/bootloader/u-boot/ARM64/{MAC}/{file}")
                && e.dut_id.as_deref() == Some(MAC) =>
            {
                Some(*n)
            }
            _ => None,
        })
    };
    assert!(sent("boot.scr").is_some_and(|n| n > 64), "{ev:?}");
    assert_eq!(sent("kernel"), Some(kernel.len() as u64), "{ev:?}");
    assert_eq!(sent("initrd"), Some(initrd.len() as u64), "{ev:?}");
    drop(ev);
    drop(boots);
}
