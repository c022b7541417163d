use std::sync::Mutex;

use super::*;
use dhcproto::v4::MAGIC;
use vivian_core::netboot::{KnownDut, StaticDuts};

const SERVER: Ipv4Addr = Ipv4Addr::new(10, 42, 0, 1);

fn net() -> Subnet {
    Subnet {
        server_ip: SERVER,
        netmask: Ipv4Addr::new(255, 255, 255, 0),
    }
}

fn packet(mac: [u8; 6], options: &[(u8, &[u8])]) -> DhcpRequest {
    let mut b = vec![0u8; packet::HEADER_LEN];
    b[0] = 1;
    b[1] = 1;
    b[2] = 6;
    b[4..8].copy_from_slice(&7u32.to_be_bytes());
    b[28..34].copy_from_slice(&mac);
    b[236..240].copy_from_slice(&MAGIC);
    for (code, data) in options {
        b.push(*code);
        b.push(data.len() as u8);
        b.extend_from_slice(data);
    }
    b.push(255);
    parse_request(&b).unwrap()
}

const PXE_PRL: &[u8] = &[1, 3, 6, 66, 67];

struct Fixture {
    engine: DhcpEngine,
    events: Arc<Mutex<Vec<BootEvent>>>,
    _root: tempfile::TempDir,
}

fn fixture(duts: Vec<KnownDut>, files: &[&str]) -> Fixture {
    let root = tempfile::tempdir().unwrap();
    for f in files {
        std::fs::write(root.path().join(f), b"x").unwrap();
    }
    let events = Arc::new(Mutex::new(Vec::new()));
    let ev2 = events.clone();
    let engine = DhcpEngine::new(
        DhcpConfig {
            executor_url: "http://ci-gateway/".into(),
            tftp_root: root.path().to_path_buf(),
            lease_time: DEFAULT_LEASE_TIME,
        },
        Arc::new(StaticDuts(duts)),
        Arc::new(move |e: BootEvent| ev2.lock().unwrap().push(e)),
    );
    Fixture {
        engine,
        events,
        _root: root,
    }
}

fn dut(id: &str, mac: [u8; 6], ip: Option<[u8; 4]>) -> KnownDut {
    KnownDut {
        id: id.into(),
        mac: MacAddr(mac),
        ip: ip.map(Ipv4Addr::from),
    }
}

#[test]
fn static_address_for_a_marsdb_dut_dynamic_for_others() {
    let f = fixture(vec![dut("dut1", [2; 6], Some([10, 42, 0, 50]))], &[]);
    let now = Instant::now();
    let a = f
        .engine
        .handle(&packet([2; 6], &[(53, &[1])]), net(), now)
        .unwrap();
    assert_eq!(a.reply.message_type, MessageType::Offer);
    assert_eq!(a.reply.yiaddr, Ipv4Addr::new(10, 42, 0, 50));
    assert_eq!(a.to, SocketAddrV4::new(Ipv4Addr::BROADCAST, 68));
    // Another client gets the lowest free address: .1 is the server.
    let b = f
        .engine
        .handle(&packet([3; 6], &[(53, &[1])]), net(), now)
        .unwrap();
    assert_eq!(b.reply.yiaddr, Ipv4Addr::new(10, 42, 0, 2));
    // The same client gets the same address again; the next one .3.
    let b2 = f
        .engine
        .handle(&packet([3; 6], &[(53, &[1])]), net(), now)
        .unwrap();
    assert_eq!(b2.reply.yiaddr, Ipv4Addr::new(10, 42, 0, 2));
    let c = f
        .engine
        .handle(&packet([4; 6], &[(53, &[1])]), net(), now)
        .unwrap();
    assert_eq!(c.reply.yiaddr, Ipv4Addr::new(10, 42, 0, 3));
    // Events only for the known DUT.
    let ev = f.events.lock().unwrap();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].dut_id.as_deref(), Some("dut1"));
    assert!(matches!(
        ev[0].kind,
        BootEventKind::Dhcp { message: DhcpMessage::Discover, given_ip: Some(ip), .. } if ip == Ipv4Addr::new(10, 42, 0, 50)
    ));
}

#[test]
fn never_gives_a_static_address_or_our_own_to_someone_else() {
    let f = fixture(vec![dut("d", [2; 6], Some([10, 42, 0, 2]))], &[]);
    let now = Instant::now();
    // .1 is ours, .2 is a DUT's static address.
    let a = f
        .engine
        .handle(&packet([9; 6], &[(53, &[1])]), net(), now)
        .unwrap();
    assert_eq!(a.reply.yiaddr, Ipv4Addr::new(10, 42, 0, 3));
    // Asking for them explicitly is refused.
    for ip in [
        [10, 42, 0, 1],
        [10, 42, 0, 2],
        [10, 42, 0, 255],
        [10, 42, 0, 0],
    ] {
        let r = f
            .engine
            .handle(&packet([8; 6], &[(53, &[3]), (50, &ip)]), net(), now)
            .unwrap();
        assert_eq!(r.reply.message_type, MessageType::Nak, "{ip:?}");
        assert_eq!(r.reply.yiaddr, Ipv4Addr::UNSPECIFIED);
    }
}

#[test]
fn request_ack_and_nak() {
    let f = fixture(vec![dut("d", [2; 6], Some([10, 42, 0, 50]))], &[]);
    let now = Instant::now();
    // A free address in the subnet is acknowledged and then leased.
    let r = f
        .engine
        .handle(
            &packet([5; 6], &[(53, &[3]), (50, &[10, 42, 0, 77])]),
            net(),
            now,
        )
        .unwrap();
    assert_eq!(r.reply.message_type, MessageType::Ack);
    assert_eq!(r.reply.yiaddr, Ipv4Addr::new(10, 42, 0, 77));
    // ... so nobody else can have it.
    let r = f
        .engine
        .handle(
            &packet([6; 6], &[(53, &[3]), (50, &[10, 42, 0, 77])]),
            net(),
            now,
        )
        .unwrap();
    assert_eq!(r.reply.message_type, MessageType::Nak);
    // Outside the subnet: NAK (broadcast).
    let r = f
        .engine
        .handle(
            &packet([5; 6], &[(53, &[3]), (50, &[192, 168, 1, 9])]),
            net(),
            now,
        )
        .unwrap();
    assert_eq!(r.reply.message_type, MessageType::Nak);
    assert_eq!(r.to, SocketAddrV4::new(Ipv4Addr::BROADCAST, 68));
    // A DUT asking for anything but its static address: NAK; its own: ACK.
    let r = f
        .engine
        .handle(
            &packet([2; 6], &[(53, &[3]), (50, &[10, 42, 0, 77])]),
            net(),
            now,
        )
        .unwrap();
    assert_eq!(r.reply.message_type, MessageType::Nak);
    let r = f
        .engine
        .handle(
            &packet([2; 6], &[(53, &[3]), (50, &[10, 42, 0, 50])]),
            net(),
            now,
        )
        .unwrap();
    assert_eq!(r.reply.message_type, MessageType::Ack);
    // A REQUEST selecting another server is not ours to answer.
    assert!(f
        .engine
        .handle(
            &packet(
                [5; 6],
                &[(53, &[3]), (54, &[10, 42, 0, 9]), (50, &[10, 42, 0, 77])]
            ),
            net(),
            now
        )
        .is_none());
    // Renewal (ciaddr set) is answered by unicast.
    let mut renew = packet([5; 6], &[(53, &[3])]);
    renew.ciaddr = Ipv4Addr::new(10, 42, 0, 77);
    let r = f.engine.handle(&renew, net(), now).unwrap();
    assert_eq!(r.reply.message_type, MessageType::Ack);
    assert_eq!(r.to, SocketAddrV4::new(Ipv4Addr::new(10, 42, 0, 77), 68));
}

#[test]
fn other_message_types_are_ignored_and_release_frees() {
    let f = fixture(vec![], &[]);
    let now = Instant::now();
    let a = f
        .engine
        .handle(&packet([5; 6], &[(53, &[1])]), net(), now)
        .unwrap();
    assert_eq!(a.reply.yiaddr, Ipv4Addr::new(10, 42, 0, 2));
    for t in [4u8, 8] {
        assert!(f
            .engine
            .handle(&packet([5; 6], &[(53, &[t])]), net(), now)
            .is_none());
    }
    assert_eq!(f.engine.leases().lock().unwrap().len(), 1);
    assert!(f
        .engine
        .handle(&packet([5; 6], &[(53, &[7])]), net(), now)
        .is_none());
    assert!(f.engine.leases().lock().unwrap().is_empty());
    let b = f
        .engine
        .handle(&packet([6; 6], &[(53, &[1])]), net(), now)
        .unwrap();
    assert_eq!(b.reply.yiaddr, Ipv4Addr::new(10, 42, 0, 2));
}

#[test]
fn expired_leases_are_reused_and_exhaustion_gives_no_offer() {
    let f = fixture(vec![], &[]);
    let small = Subnet {
        server_ip: Ipv4Addr::new(10, 42, 0, 1),
        netmask: Ipv4Addr::new(255, 255, 255, 252),
    };
    // A /30 has .1 (server) and .2 only.
    let now = Instant::now();
    let a = f
        .engine
        .handle(&packet([5; 6], &[(53, &[1])]), small, now)
        .unwrap();
    assert_eq!(a.reply.yiaddr, Ipv4Addr::new(10, 42, 0, 2));
    assert!(f
        .engine
        .handle(&packet([6; 6], &[(53, &[1])]), small, now)
        .is_none());
    let later = now + DEFAULT_LEASE_TIME + Duration::from_secs(1);
    let b = f
        .engine
        .handle(&packet([6; 6], &[(53, &[1])]), small, later)
        .unwrap();
    assert_eq!(b.reply.yiaddr, Ipv4Addr::new(10, 42, 0, 2));
}

#[test]
fn relayed_requests_go_back_to_the_relay() {
    let f = fixture(vec![], &[]);
    let mut p = packet([5; 6], &[(53, &[1])]);
    p.giaddr = Ipv4Addr::new(10, 42, 0, 200);
    let a = f.engine.handle(&p, net(), Instant::now()).unwrap();
    assert_eq!(a.to, SocketAddrV4::new(Ipv4Addr::new(10, 42, 0, 200), 67));
    assert_eq!(&a.bytes[24..28], &[10, 42, 0, 200]);
}

#[test]
fn bootfile_choice() {
    let f = fixture(
        vec![dut("d", [2; 6], None)],
        &[
            "i386-undionly.kpxe",
            "x86_64-snponly.efi",
            "arm64-snponly.efi",
        ],
    );
    let now = Instant::now();
    let pxe = |arch: &[u8], extra: &[(u8, &[u8])]| {
        let mut opts: Vec<(u8, &[u8])> = vec![(53, &[1]), (93, arch), (55, PXE_PRL)];
        opts.extend_from_slice(extra);
        f.engine
            .handle(&packet([2; 6], &opts), net(), now)
            .unwrap()
            .reply
    };
    // BIOS PXE ROM: iPXE for BIOS, over TFTP.
    let r = pxe(&[0, 0], &[]);
    assert_eq!(r.bootfile.as_deref(), Some("i386-undionly.kpxe"));
    assert!(!r.ipxe_no_proxydhcp);
    // UEFI: the per-arch snponly binary.
    assert_eq!(
        pxe(&[0, 7], &[]).bootfile.as_deref(),
        Some("x86_64-snponly.efi")
    );
    assert_eq!(
        pxe(&[0, 9], &[]).bootfile.as_deref(),
        Some("x86_64-snponly.efi")
    );
    assert_eq!(
        pxe(&[0, 11], &[]).bootfile.as_deref(),
        Some("arm64-snponly.efi")
    );
    // Missing binary: still the canonical name (the operator sees it fail).
    assert_eq!(
        pxe(&[0, 10], &[]).bootfile.as_deref(),
        Some("arm32-snponly.efi")
    );
    // iPXE: the boot script URL, plus option 175.
    let r = pxe(&[0, 0], &[(77, b"iPXE")]);
    assert_eq!(
        r.bootfile.as_deref(),
        Some("http://ci-gateway/boot/02:02:02:02:02:02/boot.ipxe?platform=pcbios&buildarch=i386")
    );
    assert!(r.ipxe_no_proxydhcp);
    let r = pxe(&[0, 7], &[(77, b"iPXE")]);
    assert_eq!(
        r.bootfile.as_deref(),
        Some("http://ci-gateway/boot/02:02:02:02:02:02/boot.ipxe?platform=efi&buildarch=x86_64")
    );
    // U-Boot (IN B.7): the generated boot script, named by arch and MAC,
    // even without option 55 asking for a boot file (U-Boot's own DHCP).
    let uboot = |arch: &[u8]| {
        f.engine
            .handle(
                &packet([2; 6], &[(53, &[1]), (93, arch), (60, b"U-Boot.armv8")]),
                net(),
                now,
            )
            .unwrap()
            .reply
    };
    let r = uboot(&[0, 0x16]);
    assert_eq!(
        r.bootfile.as_deref(),
        Some("/dyn/bootloader/u-boot/ARM64/02:02:02:02:02:02/boot.scr")
    );
    assert!(!r.ipxe_no_proxydhcp);
    assert_eq!(
        uboot(&[0, 0x15]).bootfile.as_deref(),
        Some("/dyn/bootloader/u-boot/ARM32/02:02:02:02:02:02/boot.scr")
    );
    // No boot file: HTTP boot (UEFI or U-Boot), RISC-V, BIOS on ARM, RPi,
    // unknown id.
    for arch in [[0u8, 16], [0, 0x18], [0, 0x1b], [0, 0x29], [0, 0x42]] {
        assert_eq!(pxe(&arch, &[]).bootfile, None, "{arch:?}");
    }
    // Not a netboot request (no option 93, or no 67 and no PXEClient): plain lease.
    let r = f
        .engine
        .handle(&packet([2; 6], &[(53, &[1]), (55, PXE_PRL)]), net(), now)
        .unwrap();
    assert_eq!(r.reply.bootfile, None);
    let r = f
        .engine
        .handle(
            &packet([2; 6], &[(53, &[1]), (93, &[0, 0]), (55, &[1, 3])]),
            net(),
            now,
        )
        .unwrap();
    assert_eq!(r.reply.bootfile, None);
    let r = f
        .engine
        .handle(
            &packet(
                [2; 6],
                &[(53, &[1]), (93, &[0, 0]), (60, b"PXEClient:Arch:00000")],
            ),
            net(),
            now,
        )
        .unwrap();
    assert_eq!(r.reply.bootfile.as_deref(), Some("i386-undionly.kpxe"));
}

#[test]
fn unknown_netbooting_machines_are_reported() {
    let f = fixture(vec![], &[]);
    let now = Instant::now();
    f.engine
        .handle(
            &packet([7; 6], &[(53, &[1]), (93, &[0, 7]), (55, PXE_PRL)]),
            net(),
            now,
        )
        .unwrap();
    // A non-netboot client (a PDU, a laptop) is not reported.
    f.engine
        .handle(&packet([8; 6], &[(53, &[1])]), net(), now)
        .unwrap();
    let ev = f.events.lock().unwrap();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].mac, MacAddr([7; 6]));
    assert_eq!(
        ev[0].kind,
        BootEventKind::UnknownNetbootRequest {
            base_name: "x86_64-uefi-tftp".into(),
            ip_address: Some(Ipv4Addr::new(10, 42, 0, 2)),
        }
    );
}
