//! A lean DHCP load generator of our own, acting as a relay (giaddr set,
//! bound on port 67, unicast to the server): `clients` pseudo-clients with
//! distinct MACs each repeat DISCOVER → OFFER → REQUEST (option 50 = the
//! offered address, option 54 = the OFFER's server id) → ACK, with at most
//! `window` exchanges outstanding. Only an ACK whose xid and chaddr match
//! the exchange counts. A packet unanswered for `TIMEOUT` is sent again,
//! up to `RETRIES` times, then the exchange is abandoned (counted) and the
//! client starts over, so losses never stall the run.
//!
//! Kept cheap: one socket, one thread, packets written in place into a
//! reused buffer (no allocation per packet), replies read with a fixed-size
//! parser of the few fields needed. The packet layout is checked once with
//! dhcproto's decoder at start.

use std::collections::VecDeque;
use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_millis(250);
const RETRIES: u8 = 3;

/// What a run measured.
pub struct Report {
    /// Completed DORAs (matching ACKs).
    pub dora: u64,
    /// Length of the run.
    pub secs: f64,
    /// DISCOVERs and REQUESTs sent (retransmissions included).
    pub sent: u64,
    /// Retransmissions.
    pub retransmits: u64,
    /// Exchanges abandoned after `RETRIES` retransmissions.
    pub abandoned: u64,
    /// NAKs and replies that matched no outstanding exchange.
    pub unexpected: u64,
    /// DORA latency percentiles (DISCOVER sent → ACK received), µs.
    pub p50_us: u32,
    /// 99th percentile, µs.
    pub p99_us: u32,
    /// CPU time of the client's thread.
    pub client_cpu: Duration,
}

#[derive(Clone, Copy, PartialEq)]
enum State {
    Idle,
    Discover,
    Request,
}

#[derive(Clone, Copy)]
struct Client {
    state: State,
    xid: u32,
    started: Instant,
    sent_at: Instant,
    retries: u8,
    offered: [u8; 4],
    server_id: [u8; 4],
}

fn mac(i: usize) -> [u8; 6] {
    let i = i as u32;
    [0x02, 0x76, 0x69, (i >> 16) as u8, (i >> 8) as u8, i as u8]
}

/// Writes a relayed DHCP request into `buf` (fixed layout, 300 bytes as BOOTP clients send).
fn write_packet(
    buf: &mut [u8; 300],
    xid: u32,
    mac: [u8; 6],
    giaddr: Ipv4Addr,
    req: Option<&Client>,
) {
    buf.fill(0);
    buf[0] = 1; // BOOTREQUEST
    buf[1] = 1; // Ethernet
    buf[2] = 6;
    buf[3] = 1; // hops: one relay
    buf[4..8].copy_from_slice(&xid.to_be_bytes());
    buf[24..28].copy_from_slice(&giaddr.octets());
    buf[28..34].copy_from_slice(&mac);
    buf[236..240].copy_from_slice(&[99, 130, 83, 99]);
    let mut o = 240;
    let mut put = |b: &[u8]| {
        buf[o..o + b.len()].copy_from_slice(b);
        o += b.len();
    };
    match req {
        None => put(&[53, 1, 1]),
        Some(c) => {
            put(&[53, 1, 3, 50, 4]);
            put(&c.offered);
            put(&[54, 4]);
            put(&c.server_id);
        }
    }
    put(&[55, 4, 1, 3, 6, 51, 255]);
}

/// The fields of a reply we need: (xid, chaddr, yiaddr, message type, server id).
type Reply = (u32, [u8; 6], [u8; 4], u8, [u8; 4]);

fn parse_reply(b: &[u8]) -> Option<Reply> {
    if b.len() < 244 || b[0] != 2 || b[236..240] != [99, 130, 83, 99] {
        return None;
    }
    let xid = u32::from_be_bytes(b[4..8].try_into().ok()?);
    let yiaddr: [u8; 4] = b[16..20].try_into().ok()?;
    let chaddr: [u8; 6] = b[28..34].try_into().ok()?;
    let (mut kind, mut sid) = (0u8, [0u8; 4]);
    let mut i = 240;
    while i < b.len() {
        match b[i] {
            0 => i += 1,
            255 => break,
            code => {
                let len = *b.get(i + 1)? as usize;
                let v = b.get(i + 2..i + 2 + len)?;
                match (code, len) {
                    (53, 1) => kind = v[0],
                    (54, 4) => sid.copy_from_slice(v),
                    _ => {}
                }
                i += 2 + len;
            }
        }
    }
    Some((xid, chaddr, yiaddr, kind, sid))
}

/// Checks the hand-written layout with dhcproto once.
fn check_layout(giaddr: Ipv4Addr) {
    use dhcproto::{v4, Decodable, Decoder};
    let mut buf = [0u8; 300];
    let c = Client {
        state: State::Request,
        xid: 7,
        started: Instant::now(),
        sent_at: Instant::now(),
        retries: 0,
        offered: [10, 97, 0, 9],
        server_id: [10, 97, 0, 1],
    };
    write_packet(&mut buf, 7, mac(5), giaddr, Some(&c));
    let m = v4::Message::decode(&mut Decoder::new(&buf)).expect("our REQUEST decodes");
    assert_eq!(m.giaddr(), giaddr);
    assert_eq!(m.opts().msg_type(), Some(v4::MessageType::Request));
    assert_eq!(
        m.opts().get(v4::OptionCode::RequestedIpAddress),
        Some(&v4::DhcpOption::RequestedIpAddress(Ipv4Addr::new(
            10, 97, 0, 9
        )))
    );
}

/// Runs the load for `duration` from `relay` (bound on its port 67) against
/// the server at `server`:67. Must be called on a thread in the namespace
/// holding `relay`.
pub fn run(
    relay: Ipv4Addr,
    server: Ipv4Addr,
    clients: usize,
    window: usize,
    duration: Duration,
) -> Report {
    assert!(clients <= 1 << 16 && window <= clients);
    check_layout(relay);
    let cpu0 = super::common::rusage_cpu(libc::RUSAGE_THREAD);
    let sock = UdpSocket::bind(SocketAddrV4::new(relay, 67)).expect("bind relay port 67");
    sock.set_read_timeout(Some(Duration::from_millis(2)))
        .unwrap();
    let to = SocketAddrV4::new(server, 67);
    let t0 = Instant::now();
    let mut cl = vec![
        Client {
            state: State::Idle,
            xid: 0,
            started: t0,
            sent_at: t0,
            retries: 0,
            offered: [0; 4],
            server_id: [0; 4],
        };
        clients
    ];
    let mut idle: VecDeque<usize> = (0..clients).collect();
    let mut gen = 0u32;
    let mut in_flight = 0usize;
    let mut lat: Vec<u32> = Vec::with_capacity(1 << 20);
    let mut r = Report {
        dora: 0,
        secs: 0.0,
        sent: 0,
        retransmits: 0,
        abandoned: 0,
        unexpected: 0,
        p50_us: 0,
        p99_us: 0,
        client_cpu: Duration::ZERO,
    };
    let mut out = [0u8; 300];
    let mut inb = [0u8; 1500];
    let mut last_scan = t0;
    let end = t0 + duration;
    let send = |out: &[u8; 300], r: &mut Report| match sock.send_to(out, to) {
        Ok(_) => r.sent += 1,
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        Err(e) => panic!("send: {e}"),
    };
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        // Fill the window with new exchanges.
        while in_flight < window {
            let Some(i) = idle.pop_front() else { break };
            gen = gen.wrapping_add(1);
            let c = &mut cl[i];
            c.xid = (gen << 16) | i as u32;
            c.state = State::Discover;
            c.started = now;
            c.sent_at = now;
            c.retries = 0;
            write_packet(&mut out, c.xid, mac(i), relay, None);
            send(&out, &mut r);
            in_flight += 1;
        }
        // Retransmit or abandon what timed out.
        if now.duration_since(last_scan) >= Duration::from_millis(20) {
            last_scan = now;
            for (i, c) in cl.iter_mut().enumerate() {
                if c.state == State::Idle || now.duration_since(c.sent_at) < TIMEOUT {
                    continue;
                }
                if c.retries >= RETRIES {
                    r.abandoned += 1;
                    c.state = State::Idle;
                    in_flight -= 1;
                    idle.push_back(i);
                    continue;
                }
                c.retries += 1;
                c.sent_at = now;
                r.retransmits += 1;
                let req = (c.state == State::Request).then_some(&*c);
                write_packet(&mut out, c.xid, mac(i), relay, req);
                send(&out, &mut r);
            }
        }
        // Replies.
        let n = match sock.recv(&mut inb) {
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(e) => panic!("recv: {e}"),
        };
        let Some((xid, chaddr, yiaddr, kind, sid)) = parse_reply(&inb[..n]) else {
            r.unexpected += 1;
            continue;
        };
        let i = (xid & 0xffff) as usize;
        let Some(c) = cl.get_mut(i) else {
            r.unexpected += 1;
            continue;
        };
        if c.xid != xid || chaddr != mac(i) {
            r.unexpected += 1;
            continue;
        }
        match (c.state, kind) {
            (State::Discover, 2) => {
                c.state = State::Request;
                c.offered = yiaddr;
                c.server_id = sid;
                c.retries = 0;
                c.sent_at = Instant::now();
                write_packet(&mut out, xid, chaddr, relay, Some(&*c));
                send(&out, &mut r);
            }
            (State::Request, 5) if yiaddr == c.offered => {
                r.dora += 1;
                lat.push(c.started.elapsed().as_micros().min(u32::MAX as u128) as u32);
                c.state = State::Idle;
                in_flight -= 1;
                idle.push_back(i);
            }
            _ => r.unexpected += 1, // duplicate, NAK, or late reply
        }
    }
    r.secs = t0.elapsed().as_secs_f64();
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    r.p50_us = pct(0.50);
    r.p99_us = pct(0.99);
    r.client_cpu = super::common::rusage_cpu(libc::RUSAGE_THREAD).saturating_sub(cpu0);
    r
}
