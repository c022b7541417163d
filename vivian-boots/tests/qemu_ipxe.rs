//! End-to-end netboot with the real firmware client: QEMU (TCG) with its
//! built-in iPXE NIC ROM, in a network namespace with a tap device, gets
//! its lease from our DHCP server, fetches `boot.ipxe` (rendered by
//! `vivian_core::netboot`) from a small HTTP server of this test, then the
//! kernel and initrd URLs of the script.

mod common;

use std::io::Write;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vivian_boots::{Boots, BootsConfig, NetworkSource, SocketSource};
use vivian_core::config::BootDefaults;
use vivian_core::netboot::{
    BootEvent, BootEventKind, BootRequest, DefaultNetboot, DhcpMessage, KnownDut, Netboot,
    NoDeployments, StaticDuts,
};

const MAC: &str = "52:54:00:12:34:56";

/// Serves `/boot/<id>/boot.ipxe?...` with our rendering and any other path
/// with a few bytes; records every request line.
async fn http_server(
    listener: std::net::TcpListener,
    netboot: Arc<DefaultNetboot>,
    log: Arc<Mutex<Vec<String>>>,
) {
    listener.set_nonblocking(true).unwrap();
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        let netboot = netboot.clone();
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
            let (status, body) = if path.starts_with("/boot/") && path.contains("/boot.ipxe") {
                let query = path.split_once('?').map(|x| x.1).unwrap_or("");
                let get = |k: &str| {
                    query
                        .split('&')
                        .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
                };
                let req = BootRequest::ipxe(get("platform"), get("buildarch"));
                match netboot.ipxe_script(None, &req).await {
                    Ok(s) => ("200 OK", s.into_bytes()),
                    Err(e) => ("400 Bad Request", e.to_string().into_bytes()),
                }
            } else if path == "/kernel" || path == "/initrd" {
                ("200 OK", b"not really a kernel".to_vec())
            } else {
                ("404 Not Found", Vec::new())
            };
            let _ = conn
                .write_all(
                    format!(
                        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n",
                        body.len()
                    )
                    .as_bytes(),
                )
                .await;
            let _ = conn.write_all(&body).await;
        });
    }
}

/// Sends an IPv6 router advertisement on `tap0` every 300 ms: iPXE waits
/// about 13 s for one before going on otherwise.
fn ra_sender(ns: &Netns, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    let path = format!("/run/netns/{}", ns.name);
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(path).unwrap();
        assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        let s = socket2::Socket::new(
            socket2::Domain::IPV6,
            socket2::Type::RAW,
            Some(socket2::Protocol::ICMPV6),
        )
        .unwrap();
        let ifindex = unsafe { libc::if_nametoindex(c"tap0".as_ptr()) };
        s.set_multicast_hops_v6(255).unwrap();
        s.set_multicast_if_v6(ifindex).unwrap();
        // type 134 (RA), code 0, checksum (kernel), hop limit 64, no flags,
        // router lifetime 0 (not a default router), no timers, no options.
        let ra = [134u8, 0, 0, 0, 64, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let to = SocketAddrV6::new(Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1), 0, 0, ifindex);
        while !stop.load(Ordering::SeqCst) {
            let _ = s.send_to(&ra, &to.into());
            std::thread::sleep(Duration::from_millis(300));
        }
    })
}

#[test]
fn qemu_ipxe_rom_boots_from_our_dhcp_and_script() {
    require("qemu-system-x86_64", "qemu-system-x86");
    assert!(
        std::path::Path::new("/usr/share/qemu/efi-virtio.rom").exists()
            || std::path::Path::new("/usr/lib/ipxe/qemu/efi-virtio.rom").exists(),
        "QEMU's iPXE NIC ROM is missing: install the Debian package `ipxe-qemu`"
    );
    logs();
    let ns = Netns::new("q");
    ns.ip(&["tuntap", "add", "dev", "tap0", "mode", "tap"]);
    ns.ip(&["addr", "add", "10.98.31.1/24", "dev", "tap0"]);
    ns.ip(&["link", "set", "tap0", "up"]);

    let (dhcp_sock, http, net) = ns.enter(|| {
        let d = vivian_boots::iface::bind_udp(
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, 67)),
            Some("tap0"),
            true,
        )
        .unwrap();
        let h = std::net::TcpListener::bind("10.98.31.1:0").unwrap();
        (d, h, vivian_boots::iface::interface_subnet("tap0").unwrap())
    });
    let base = format!("http://{}", http.local_addr().unwrap());
    let netboot = Arc::new(DefaultNetboot::new(
        BootDefaults::from_vars([
            ("BOOTS_DEFAULT_KERNEL", format!("{base}/kernel")),
            ("BOOTS_DEFAULT_INITRD", format!("{base}/initrd")),
            ("BOOTS_DEFAULT_CMDLINE", "console=ttyS0 a;b".to_string()),
        ]),
        Arc::new(NoDeployments),
    ));

    let rt = runtime();
    let requests = Arc::new(Mutex::new(Vec::<String>::new()));
    rt.spawn(http_server(http, netboot, requests.clone()));
    let events = Arc::new(Mutex::new(Vec::new()));
    let ev2 = events.clone();
    let cfg = BootsConfig::new("tap0", "/nonexistent", base.clone());
    let boots = {
        let _g = rt.enter();
        Boots::start_with(
            &cfg,
            SocketSource::Given(dhcp_sock),
            SocketSource::Disabled,
            NetworkSource::Fixed(net),
            Arc::new(StaticDuts(vec![KnownDut {
                id: "qemu-dut".into(),
                mac: MAC.parse().unwrap(),
                ip: Some(Ipv4Addr::new(10, 98, 31, 50)),
            }])),
            Arc::new(move |e: BootEvent| ev2.lock().unwrap().push(e)),
        )
        .unwrap()
    };

    let stop_ra = Arc::new(AtomicBool::new(false));
    let ra = ra_sender(&ns, stop_ra.clone());
    let console = tempfile::NamedTempFile::new().unwrap();
    let started = Instant::now();
    let qemu = KillOnDrop(
        ns.command("qemu-system-x86_64")
            .args([
                "-accel",
                "tcg",
                "-m",
                "256",
                "-nographic",
                "-no-reboot",
                "-netdev",
                "tap,id=n0,ifname=tap0,script=no,downscript=no",
                "-device",
                &format!("virtio-net-pci,netdev=n0,mac={MAC}"),
                "-boot",
                "n",
            ])
            .stdin(std::process::Stdio::null())
            .stdout(console.reopen().unwrap())
            .stderr(console.reopen().unwrap())
            .spawn()
            .expect("start qemu"),
    );

    // Bounded wait for iPXE to ask for the initrd (after boot.ipxe and kernel).
    let deadline = started + Duration::from_secs(60);
    while Instant::now() < deadline && !requests.lock().unwrap().iter().any(|p| p == "/initrd") {
        std::thread::sleep(Duration::from_millis(100));
    }
    let elapsed = started.elapsed();
    drop(qemu);
    stop_ra.store(true, Ordering::SeqCst);
    ra.join().unwrap();
    let console_text = std::fs::read_to_string(console.path()).unwrap_or_default();
    let reqs = requests.lock().unwrap().clone();
    let _ = writeln!(
        std::io::stderr(),
        "QEMU netboot to initrd request: {elapsed:?}"
    );
    assert!(
        reqs.iter().any(|p| p == "/initrd"),
        "iPXE did not fetch the initrd within 60 s; HTTP requests: {reqs:?}\nconsole:\n{console_text}"
    );
    // iPXE percent-encodes the colons of the MAC in the path: the REST
    // route must decode its `<id>` segment.
    assert_eq!(
        reqs[0].replace("%3A", ":"),
        format!("/boot/{MAC}/boot.ipxe?platform=pcbios&buildarch=i386"),
        "{reqs:?}"
    );
    let kernel_at = reqs
        .iter()
        .position(|p| p == "/kernel")
        .expect("kernel fetched");
    let initrd_at = reqs.iter().position(|p| p == "/initrd").unwrap();
    assert!(kernel_at < initrd_at, "{reqs:?}");

    // The DUT's DHCP exchanges are in its timeline, with the script URL.
    let ev = events.lock().unwrap();
    let url = format!("{base}/boot/{MAC}/boot.ipxe?platform=pcbios&buildarch=i386");
    let dhcp: Vec<_> = ev
        .iter()
        .filter_map(|e| match &e.kind {
            BootEventKind::Dhcp {
                message,
                ipxe: true,
                given_ip: Some(ip),
                bootfile: Some(b),
                ..
            } if *ip == Ipv4Addr::new(10, 98, 31, 50) && *b == url => Some(*message),
            _ => None,
        })
        .collect();
    assert!(dhcp.contains(&DhcpMessage::Discover), "{ev:?}");
    assert!(dhcp.contains(&DhcpMessage::Request), "{ev:?}");
    drop(ev);
    drop(boots);
}
