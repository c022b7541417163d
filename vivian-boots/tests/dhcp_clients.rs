//! The DHCP server against real DHCP clients (busybox udhcpc, ISC
//! dhclient) in network namespaces.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use vivian_boots::{Boots, BootsConfig, NetworkSource, SocketSource};
use vivian_core::marsdb::MacAddr;
use vivian_core::netboot::{BootEvent, BootEventKind, DhcpMessage, KnownDut, StaticDuts};

/// The udhcpc script: writes the variables udhcpc exports on `bound`.
const SCRIPT: &str = r#"#!/bin/sh
if [ "$1" = bound ]; then
  echo "ip=$ip subnet=$subnet router=$router dns=$dns serverid=$serverid bootfile=$bootfile siaddr=$siaddr lease=$lease tftp=$tftp" > "$OUT"
fi
"#;

struct Env {
    _rt: tokio::runtime::Runtime,
    pair: VethPair,
    boots: Boots,
    events: Arc<Mutex<Vec<BootEvent>>>,
    dir: tempfile::TempDir,
}

fn start(octet: u8, duts: Vec<KnownDut>) -> Env {
    logs();
    let pair = VethPair::new("d", octet);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("i386-undionly.kpxe"), b"ipxe").unwrap();
    let mut cfg = BootsConfig::new("v0", dir.path(), "http://ci-gateway");
    cfg.dhcp_bind = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 67));
    // Sockets and the interface's address are read inside the namespace,
    // as the executor does with PRIVATE_INTERFACE.
    let (sock, net) = pair.srv.enter(|| {
        let s = vivian_boots::iface::bind_udp(
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, 67)),
            Some("v0"),
            true,
        )
        .unwrap();
        let net = vivian_boots::iface::interface_subnet("v0").unwrap();
        (s, net)
    });
    assert_eq!(net.netmask, Ipv4Addr::new(255, 255, 255, 0));
    let events = Arc::new(Mutex::new(Vec::new()));
    let ev2 = events.clone();
    let rt = runtime();
    let guard = rt.enter();
    let boots = Boots::start_with(
        &cfg,
        SocketSource::Given(sock),
        SocketSource::Disabled,
        NetworkSource::Fixed(net),
        Arc::new(StaticDuts(duts)),
        Arc::new(move |e: BootEvent| ev2.lock().unwrap().push(e)),
    )
    .unwrap();
    drop(guard);
    Env {
        _rt: rt,
        pair,
        boots,
        events,
        dir,
    }
}

impl Env {
    fn udhcpc(&self, mac: &str, extra: &[&str]) -> String {
        require("busybox", "busybox");
        self.pair.cli.ip(&["link", "set", "v1", "address", mac]);
        let script = self.dir.path().join("script.sh");
        std::fs::write(&script, SCRIPT).unwrap();
        let _ = std::process::Command::new("chmod")
            .args(["+x", script.to_str().unwrap()])
            .status();
        let out = self.dir.path().join("out");
        let _ = std::fs::remove_file(&out);
        let mut args = vec![
            "env",
            "OUT=",
            "busybox",
            "udhcpc",
            "-i",
            "v1",
            "-f",
            "-q",
            "-n",
            "-t",
            "3",
            "-T",
            "1",
            "-s",
            script.to_str().unwrap(),
        ];
        let out_env = format!("OUT={}", out.display());
        args[1] = &out_env;
        args.extend_from_slice(extra);
        let o = self.pair.cli.run(&args, Duration::from_secs(15));
        assert!(
            o.status.success(),
            "udhcpc failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        std::fs::read_to_string(&out).expect("udhcpc bound")
    }
}

fn field<'a>(line: &'a str, name: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name} in {line}"))
}

#[test]
fn udhcpc_gets_static_and_dynamic_addresses() {
    let dut_mac: MacAddr = "52:54:00:aa:bb:01".parse().unwrap();
    let env = start(
        11,
        vec![KnownDut {
            id: "52:54:00:aa:bb:01".into(),
            mac: dut_mac,
            ip: Some(Ipv4Addr::new(10, 98, 11, 50)),
        }],
    );
    let p = &env.pair.prefix;

    // The MarsDB DUT gets its static address, and netboot options when it
    // asks like a PXE ROM (option 93 = 0, boot file requested).
    let r = env.udhcpc(
        "52:54:00:aa:bb:01",
        &[
            "-V",
            "PXEClient:Arch:00000:UNDI:002001",
            "-x",
            "0x5d:0000",
            "-O",
            "67",
            "-O",
            "66",
        ],
    );
    assert_eq!(field(&r, "ip"), format!("{p}.50"));
    assert_eq!(field(&r, "subnet"), "255.255.255.0");
    assert_eq!(field(&r, "router"), format!("{p}.1"));
    assert_eq!(field(&r, "dns"), format!("{p}.1"));
    assert_eq!(field(&r, "serverid"), format!("{p}.1"));
    assert_eq!(field(&r, "siaddr"), format!("{p}.1"));
    assert_eq!(field(&r, "lease"), "86400");
    assert_eq!(field(&r, "bootfile"), "i386-undionly.kpxe");
    assert_eq!(field(&r, "tftp"), format!("{p}.1"));

    // Any other client gets a dynamic lease: the lowest free address.
    let r = env.udhcpc("52:54:00:aa:bb:02", &[]);
    assert_eq!(field(&r, "ip"), format!("{p}.2"));
    assert_eq!(field(&r, "bootfile"), "");
    let r = env.udhcpc("52:54:00:aa:bb:03", &[]);
    assert_eq!(field(&r, "ip"), format!("{p}.3"));
    // ... and the same one again when it comes back.
    let r = env.udhcpc("52:54:00:aa:bb:02", &[]);
    assert_eq!(field(&r, "ip"), format!("{p}.2"));
    // A client insisting on the DUT's address does not get it.
    let r = env.udhcpc("52:54:00:aa:bb:04", &["-r", &format!("{p}.50")]);
    assert_eq!(field(&r, "ip"), format!("{p}.4"));

    // The DUT's DISCOVER and REQUEST are in its boot timeline; nobody
    // else's exchanges are.
    let ev = env.events.lock().unwrap();
    let kinds: Vec<_> = ev
        .iter()
        .map(|e| match &e.kind {
            BootEventKind::Dhcp {
                message,
                given_ip,
                bootfile,
                ..
            } => {
                assert_eq!(e.dut_id.as_deref(), Some("52:54:00:aa:bb:01"));
                assert_eq!(*given_ip, Some(Ipv4Addr::new(10, 98, 11, 50)));
                assert_eq!(bootfile.as_deref(), Some("i386-undionly.kpxe"));
                *message
            }
            other => panic!("unexpected event {other:?}"),
        })
        .collect();
    assert_eq!(kinds, vec![DhcpMessage::Discover, DhcpMessage::Request]);
    drop(ev);
    env.boots.shutdown();
}

#[test]
fn dhclient_gets_a_lease() {
    require("dhclient", "isc-dhcp-client");
    let env = start(12, vec![]);
    env.pair
        .cli
        .ip(&["link", "set", "v1", "address", "52:54:00:aa:cc:01"]);
    let d = env.dir.path();
    let leases = d.join("leases");
    let pid = d.join("pid");
    let o = env.pair.cli.run(
        &[
            "dhclient",
            "-1",
            "-sf",
            "/bin/true",
            "-lf",
            leases.to_str().unwrap(),
            "-pf",
            pid.to_str().unwrap(),
            "v1",
        ],
        Duration::from_secs(20),
    );
    // dhclient forks into the background after binding: stop it.
    if let Ok(p) = std::fs::read_to_string(&pid) {
        let _ = std::process::Command::new("kill").arg(p.trim()).status();
    }
    assert!(
        o.status.success(),
        "dhclient: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let l = std::fs::read_to_string(&leases).unwrap();
    assert!(l.contains("fixed-address 10.98.12.2;"), "{l}");
    assert!(
        l.contains("option dhcp-server-identifier 10.98.12.1;"),
        "{l}"
    );
}
