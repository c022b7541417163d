//! Any datagram given to the DHCP server: parse it, and when it parses,
//! run the server's decision and encode the reply. Nothing may panic, and
//! a reply is always a well-formed BOOTREPLY.
#![no_main]

use std::net::Ipv4Addr;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use vivian_boots::dhcp::{parse_request, DhcpConfig, DhcpEngine, Subnet, DEFAULT_LEASE_TIME};
use vivian_core::netboot::{discard_events, KnownDut, StaticDuts};

fn engine() -> &'static DhcpEngine {
    static E: OnceLock<DhcpEngine> = OnceLock::new();
    E.get_or_init(|| {
        DhcpEngine::new(
            DhcpConfig {
                executor_url: "http://ci-gateway".into(),
                tftp_root: std::env::temp_dir(),
                lease_time: DEFAULT_LEASE_TIME,
            },
            Arc::new(StaticDuts(vec![KnownDut {
                id: "dut".into(),
                mac: "52:54:00:00:00:01".parse().unwrap(),
                ip: Some(Ipv4Addr::new(10, 42, 0, 50)),
            }])),
            discard_events(),
        )
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(req) = parse_request(data) else {
        return;
    };
    let net = Subnet {
        server_ip: Ipv4Addr::new(10, 42, 0, 1),
        netmask: Ipv4Addr::new(255, 255, 255, 0),
    };
    if let Some(answer) = engine().handle(&req, net, Instant::now()) {
        assert!(answer.bytes.len() >= 300);
        assert_eq!(answer.bytes[0], 2);
        assert_eq!(answer.bytes[4..8], data[4..8]);
    }
});
