//! DHCP throughput: full DORA exchanges per second with ISC's `perfdhcp`
//! (package kea-admin) against our server, in a pair of network namespaces
//! (perfdhcp acts as a relay: giaddr set, replies to port 67). The server's
//! subnet is a /16 so the 30,000 simulated clients all get addresses.
//! Besides DORA/s (which on a shared 2-core machine depends on what else
//! runs, perfdhcp included), it prints the server's CPU time per DORA
//! (getrusage of this process, where the server runs) and the rate one
//! fully used core would sustain at that cost. perfdhcp runs in its
//! single-thread mode (`-g single`): its default on several CPUs adds a
//! receiver thread that, on this 2-core machine, takes CPU from the server
//! without sending more.
//!
//!
//! perfdhcp cannot send more than ~5,500 DISCOVERs/s on this machine, so
//! the bench then runs our own client (`support/dora_client.rs`: one
//! thread, one socket bound as the relay on 10.97.0.2:67, 10,000 MACs,
//! 64 or 256 exchanges in flight, retransmission after 250 ms) and prints
//! DORA/s, p50/p99 DORA latency and CPU per DORA for server and client.
//! The split of CPU between them is approximate: on a veth pair the
//! receiving side's kernel work partly runs in the sender's context.
//!
//! `cargo bench -p vivian-boots --bench dhcp` (needs root and perfdhcp).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/dora_client.rs"]
mod dora_client;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use common::{require, runtime, rusage_cpu, Netns};
use vivian_boots::{Boots, BootsConfig, NetworkSource, SocketSource, Subnet};
use vivian_core::netboot::{discard_events, StaticDuts};

/// The server's decisions alone (parse, lease, encode), no sockets: the
/// ceiling of what the socket loop can reach.
fn engine_only() {
    use std::time::Instant;
    use vivian_boots::dhcp::{parse_request, DhcpConfig, DhcpEngine, DEFAULT_LEASE_TIME};
    let engine = DhcpEngine::new(
        DhcpConfig {
            executor_url: "http://ci-gateway".into(),
            tftp_root: "/nonexistent".into(),
            lease_time: DEFAULT_LEASE_TIME,
        },
        Arc::new(StaticDuts::default()),
        discard_events(),
    );
    let net = Subnet {
        server_ip: Ipv4Addr::new(10, 97, 0, 1),
        netmask: Ipv4Addr::new(255, 255, 0, 0),
    };
    let packet = |i: u32, t: u8, ip: Option<[u8; 4]>| {
        let mut b = vec![0u8; 240];
        b[0] = 1;
        b[1] = 1;
        b[2] = 6;
        b[4..8].copy_from_slice(&i.to_be_bytes());
        b[28..30].copy_from_slice(&[2, 0]);
        b[30..34].copy_from_slice(&i.to_be_bytes());
        b[236..240].copy_from_slice(&[99, 130, 83, 99]);
        b.extend_from_slice(&[53, 1, t, 55, 4, 1, 3, 6, 51]);
        if let Some(ip) = ip {
            b.extend_from_slice(&[50, 4]);
            b.extend_from_slice(&ip);
        }
        b.push(255);
        b
    };
    let n = 50_000u32;
    let cpu0 = rusage_cpu(libc::RUSAGE_THREAD);
    let t = Instant::now();
    for i in 0..n {
        let now = Instant::now();
        let offer = engine
            .handle(&parse_request(&packet(i, 1, None)).unwrap(), net, now)
            .unwrap();
        let ip = offer.reply.yiaddr.octets();
        let ack = engine
            .handle(&parse_request(&packet(i, 3, Some(ip))).unwrap(), net, now)
            .unwrap();
        assert_eq!(ack.reply.yiaddr.octets(), ip);
    }
    let secs = t.elapsed().as_secs_f64();
    let cpu = rusage_cpu(libc::RUSAGE_THREAD).saturating_sub(cpu0);
    println!(
        "DHCP engine alone (parse, allocate, encode; no sockets): {:.0} DORA/s over {n} clients, \
         {:.2} us CPU per DORA",
        n as f64 / secs,
        cpu.as_secs_f64() * 1e6 / n as f64
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    engine_only();
    require("perfdhcp", "kea-admin");
    let srv = Netns::new("bs");
    let cli = Netns::new("bc");
    let out = std::process::Command::new("ip")
        .args([
            "link", "add", "v0", "netns", &srv.name, "type", "veth", "peer", "name", "v1", "netns",
            &cli.name,
        ])
        .status()
        .unwrap();
    assert!(out.success());
    srv.ip(&["addr", "add", "10.97.0.1/16", "dev", "v0"]);
    srv.ip(&["link", "set", "v0", "up"]);
    cli.ip(&["addr", "add", "10.97.0.2/16", "dev", "v1"]);
    cli.ip(&["link", "set", "v1", "up"]);

    let sock = srv.enter(|| {
        vivian_boots::iface::bind_udp(
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, 67)),
            Some("v0"),
            true,
        )
        .unwrap()
    });
    let rt = runtime();
    let cfg = BootsConfig::new("v0", "/nonexistent", "http://ci-gateway");
    let boots = {
        let _g = rt.enter();
        Boots::start_with(
            &cfg,
            SocketSource::Given(sock),
            SocketSource::Disabled,
            NetworkSource::Fixed(Subnet {
                server_ip: Ipv4Addr::new(10, 97, 0, 1),
                netmask: Ipv4Addr::new(255, 255, 0, 0),
            }),
            Arc::new(StaticDuts::default()),
            discard_events(),
        )
        .unwrap()
    };

    println!("DHCP DORA exchanges with perfdhcp (relayed), 5 s per rate:");
    for rate in ["5000", "10000", "15000", "20000"] {
        // The server's threads: everything in this process but this one
        // (which only waits for perfdhcp).
        let server_cpu =
            || rusage_cpu(libc::RUSAGE_SELF).saturating_sub(rusage_cpu(libc::RUSAGE_THREAD));
        let cpu0 = server_cpu();
        let client0 = rusage_cpu(libc::RUSAGE_CHILDREN);
        let o = cli.run(
            &[
                "perfdhcp",
                "-4",
                "-g",
                "single",
                "-l",
                "v1",
                "-r",
                rate,
                "-R",
                "30000",
                "-p",
                "5",
                "-W",
                "200000",
                "10.97.0.1",
            ],
            Duration::from_secs(30),
        );
        let cpu = server_cpu().saturating_sub(cpu0);
        let client_cpu = rusage_cpu(libc::RUSAGE_CHILDREN).saturating_sub(client0);
        let text = String::from_utf8_lossy(&o.stdout);
        // The report has a block per exchange: DISCOVER-OFFER, REQUEST-ACK.
        let ra = text.split("REQUEST-ACK").nth(1).unwrap_or("");
        let dor = text
            .split("DISCOVER-OFFER")
            .nth(1)
            .unwrap_or("")
            .split("REQUEST-ACK")
            .next()
            .unwrap_or("");
        let field = |block: &str, name: &str| -> u64 {
            block
                .lines()
                .find_map(|l| l.trim().strip_prefix(name))
                .and_then(|v| v.trim_start_matches(':').trim().parse().ok())
                .unwrap_or(0)
        };
        let acks = field(ra, "received packets");
        let sent = field(ra, "sent packets");
        let discovers = field(dor, "sent packets");
        let offers = field(dor, "received packets");
        let avg = ra
            .lines()
            .find(|l| l.contains("avg delay"))
            .unwrap_or("")
            .trim()
            .to_string();
        let per_dora = cpu.as_secs_f64() / acks.max(1) as f64;
        println!(
            "  offered {rate:>5}/s: {:8.0} DORA/s completed ({discovers} DISCOVERs, {offers} OFFERs, \
             {sent} REQUESTs, {acks} ACKs), {avg}\n    server CPU {:.1} us per DORA \
             (= {:.0} DORA/s per core), perfdhcp CPU {:.2} s",
            acks as f64 / 5.0,
            per_dora * 1e6,
            1.0 / per_dora,
            client_cpu.as_secs_f64()
        );
        if acks == 0 {
            eprintln!("{text}\n{}", String::from_utf8_lossy(&o.stderr));
        }
    }

    // Our own client (benches/support/dora_client.rs): same relay address,
    // 10,000 distinct MACs (their leases are renewed on each DORA, so the
    // /16 pool is never exhausted), bounded window, 5 s per window size.
    println!(
        "DHCP DORA exchanges with our own client (relayed, 10,000 MACs, one socket, one thread), 5 s per window:"
    );
    for window in [64usize, 256] {
        let cpu0 = rusage_cpu(libc::RUSAGE_SELF);
        let r = cli.enter(move || {
            dora_client::run(
                Ipv4Addr::new(10, 97, 0, 2),
                Ipv4Addr::new(10, 97, 0, 1),
                10_000,
                window,
                Duration::from_secs(5),
            )
        });
        // Everything this process used but the client's thread is the
        // server's (the main thread only waits).
        let cpu = rusage_cpu(libc::RUSAGE_SELF)
            .saturating_sub(cpu0)
            .saturating_sub(r.client_cpu);
        let per_dora = cpu.as_secs_f64() / r.dora.max(1) as f64;
        println!(
            "  window {window:>3}: {:8.0} DORA/s completed ({} DORAs in {:.2} s, {} packets sent, \
             {} retransmitted, {} abandoned, {} unexpected replies), latency p50 {} us, p99 {} us\n    \
             server CPU {:.1} us per DORA (= {:.0} DORA/s per core), client CPU {:.2} s ({:.1} us per DORA)",
            r.dora as f64 / r.secs,
            r.dora,
            r.secs,
            r.sent,
            r.retransmits,
            r.abandoned,
            r.unexpected,
            r.p50_us,
            r.p99_us,
            per_dora * 1e6,
            1.0 / per_dora,
            r.client_cpu.as_secs_f64(),
            r.client_cpu.as_secs_f64() * 1e6 / r.dora.max(1) as f64,
        );
    }
    drop(boots);
}
