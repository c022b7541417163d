//! systemd socket activation with the real `systemd-socket-activate`: the
//! DHCP and TFTP servers take their sockets by name (here renamed through
//! `BOOTS_DHCP_IPv4_SOCKET_NAME` / `BOOTS_TFTP_IPv4_SOCKET_NAME`) instead
//! of binding their own.
//!
//! The child process is this test binary again, running the ignored test
//! `activation_child` (which does nothing unless started that way).

mod common;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use vivian_boots::{activation, Boots, BootsConfig};
use vivian_core::netboot::{discard_events, StaticDuts};

#[test]
#[ignore = "child process of socket_activation_by_name"]
fn activation_child() {
    let Some(root) = std::env::var_os("VB_CHILD_TFTP_ROOT") else {
        return;
    };
    let names = activation::available_names().unwrap();
    let dhcp_name = std::env::var("BOOTS_DHCP_IPv4_SOCKET_NAME").unwrap();
    let tftp_name = std::env::var("BOOTS_TFTP_IPv4_SOCKET_NAME").unwrap();
    assert_eq!(
        names,
        vec![Some(dhcp_name.clone()), Some(tftp_name.clone())]
    );
    // A socket of the wrong kind is refused with its name, and not taken.
    let err = activation::listeners_named(&dhcp_name).unwrap_err();
    assert!(err.to_string().contains("not a stream socket"), "{err}");

    let mut cfg = BootsConfig::new("lo", root, "http://ci-gateway");
    cfg.dhcp_socket_name = dhcp_name;
    cfg.tftp_socket_name = tftp_name;
    // Unreachable fallbacks: if activation were ignored, the test fails.
    cfg.dhcp_bind = SocketAddr::from((Ipv4Addr::LOCALHOST, 1));
    cfg.tftp_bind = SocketAddr::from((Ipv4Addr::LOCALHOST, 2));
    let rt = runtime();
    let _g = rt.enter();
    let boots = Boots::start(&cfg, Arc::new(StaticDuts::default()), discard_events()).unwrap();
    assert!(activation::available_names().unwrap().is_empty());
    assert_eq!(
        boots.tftp_local_addr(),
        Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 69)))
    );
    // Serve for a bounded time; the parent kills us sooner.
    std::thread::sleep(Duration::from_secs(30));
}

fn dhcp_request(ciaddr: Ipv4Addr) -> Vec<u8> {
    let mut b = vec![0u8; 240];
    b[0] = 1;
    b[1] = 1;
    b[2] = 6;
    b[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    b[12..16].copy_from_slice(&ciaddr.octets());
    b[28..34].copy_from_slice(&[2, 0, 0, 0, 0, 5]);
    b[236..240].copy_from_slice(&[99, 130, 83, 99]);
    b.extend_from_slice(&[53, 1, 3, 255]);
    b
}

#[test]
fn socket_activation_by_name() {
    require("systemd-socket-activate", "systemd");
    require("curl", "curl");
    let ns = Netns::new("a");
    let root = tempfile::tempdir().unwrap();
    let data = content(100_000, 9);
    std::fs::write(root.path().join("hello.bin"), &data).unwrap();
    let exe = std::env::current_exe().unwrap();
    let root_env = format!("VB_CHILD_TFTP_ROOT={}", root.path().display());
    let _child = KillOnDrop(
        ns.command("systemd-socket-activate")
            .args([
                "-d",
                "-l",
                "127.0.0.1:67",
                "-l",
                "127.0.0.1:69",
                "--fdname=boots_dhcp:boots_tftp",
                "-E",
                &root_env,
                "-E",
                "BOOTS_DHCP_IPv4_SOCKET_NAME=boots_dhcp",
                "-E",
                "BOOTS_TFTP_IPv4_SOCKET_NAME=boots_tftp",
                exe.to_str().unwrap(),
                "--exact",
                "activation_child",
                "--ignored",
                "--nocapture",
            ])
            .spawn()
            .expect("start systemd-socket-activate"),
    );

    // TFTP through the activated socket (curl retries while the child starts).
    let out = root.path().join("out.bin");
    let mut fetched = false;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline && !fetched {
        let o = ns.run(
            &[
                "curl",
                "-sS",
                "--max-time",
                "5",
                "-o",
                out.to_str().unwrap(),
                "tftp://127.0.0.1/hello.bin",
            ],
            Duration::from_secs(10),
        );
        fetched = o.status.success();
        if !fetched {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    assert!(fetched, "no TFTP answer through the activated socket");
    assert!(std::fs::read(&out).unwrap() == data);

    // DHCP through the activated socket: a renewing client (ciaddr set) is
    // answered by unicast with an ACK; the subnet is lo's 127.0.0.0/8.
    let reply = ns.enter(|| {
        let s = UdpSocket::bind("127.0.0.5:68").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.send_to(&dhcp_request(Ipv4Addr::new(127, 0, 0, 5)), "127.0.0.1:67")
            .unwrap();
        let mut b = [0u8; 1500];
        let (n, _) = s.recv_from(&mut b).expect("DHCP reply");
        b[..n].to_vec()
    });
    assert_eq!(reply[0], 2, "BOOTREPLY");
    assert_eq!(&reply[4..8], &0x1234_5678u32.to_be_bytes());
    assert_eq!(&reply[16..20], &[127, 0, 0, 5], "yiaddr");
    assert_eq!(&reply[240..243], &[53, 1, 5], "DHCPACK");
}
