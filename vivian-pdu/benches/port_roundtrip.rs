//! Time from a port command to the readback that confirms it, for the
//! virtual PDU (our `vpdu` server on 127.0.0.1) and a real net-snmp `snmpd`
//! (APC table through a pass_persist script).
//!
//! Run: `cargo build -p vivian --bin vpdu && cargo bench -p vivian-pdu --bench
//! port_roundtrip` (needs snmpd, snmp). The vpdu peer is the real `vpdu`
//! binary: `VPDU_BIN`, else `vpdu` next to this bench's target directory
//! (release, then debug).
//! Two paths are measured per peer:
//! * driver: `set_state` then `get_state` until it reads the new state;
//! * layer: `PduHandle::set_port_state` (the per-PDU task: current-state read,
//!   write) then `PduHandle::get_port_state`, with a zero minimum off time and
//!   no state-transition delay (production adds 1 s after an SNMP write).

use std::time::{Duration, Instant};

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use vivian_core::pdu::{PduDriver, PduHandle, PduOptions, PortState};
use vivian_pdu::snmp::{SnmpDriver, APC_MASTERSWITCH};
use vivian_pdu::test_peers::Snmpd;
use vivian_pdu::vpdu::VpduDriver;

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let n = samples.len();
    let pct = |p: f64| samples[((n as f64 - 1.0) * p).round() as usize];
    let mean = samples.iter().sum::<Duration>() / n as u32;
    println!(
        "{name:<28} n={n:<4} min={:>8.3} ms  median={:>8.3} ms  p95={:>8.3} ms  max={:>8.3} ms  mean={:>8.3} ms",
        ms(samples[0]),
        ms(pct(0.5)),
        ms(pct(0.95)),
        ms(samples[n - 1]),
        ms(mean)
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn target(i: usize) -> PortState {
    if i % 2 == 0 {
        PortState::Off
    } else {
        PortState::On
    }
}

async fn driver_roundtrip(d: &dyn PduDriver, port: &str, n: usize) -> Vec<Duration> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let want = target(i);
        let t = Instant::now();
        d.set_state(port, want).await.expect("set");
        let mut reads = 0;
        while d.get_state(port).await.expect("get") != want {
            reads += 1;
            assert!(reads < 1000, "the state never read back");
        }
        out.push(t.elapsed());
    }
    out
}

async fn layer_roundtrip(pdu: &PduHandle, port: &str, n: usize) -> Vec<Duration> {
    pdu.set_min_off_time(port, Some(Duration::ZERO))
        .await
        .expect("min off time");
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let want = target(i);
        let t = Instant::now();
        pdu.set_port_state(port, want).await.expect("set");
        let mut reads = 0;
        while pdu.get_port_state(port).await.expect("get") != want {
            reads += 1;
            assert!(reads < 1000, "the state never read back");
        }
        out.push(t.elapsed());
    }
    out
}

/// The `vpdu` binary, killed on drop.
struct VpduPeer {
    child: Child,
    addr: String,
}

impl VpduPeer {
    fn start() -> Self {
        let bin = std::env::var_os("VPDU_BIN")
            .map(PathBuf::from)
            .or_else(|| {
                // benches run from <target>/release/deps/port_roundtrip-*
                let exe = std::env::current_exe().ok()?;
                let target = exe.parent()?.parent()?.parent()?.to_path_buf();
                ["release", "debug"]
                    .iter()
                    .map(|p| target.join(p).join("vpdu"))
                    .find(|p| p.is_file())
            })
            .expect("no vpdu binary: build it (cargo build -p vivian --bin vpdu) or set VPDU_BIN");
        let mut child = Command::new(&bin)
            .args(["--host", "127.0.0.1", "--port", "0"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .split_whitespace()
            .nth(3)
            .expect("vpdu address")
            .to_string();
        println!("vpdu peer: {} on {addr}", bin.display());
        Self { child, addr }
    }
}

impl Drop for VpduPeer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::main]
async fn main() {
    let n = 200;
    let peer = VpduPeer::start();
    let d = VpduDriver::new(peer.addr.clone());
    driver_roundtrip(&d, "3", 20).await; // warm-up
    report("vpdu driver", driver_roundtrip(&d, "3", n).await);
    let pdu = PduHandle::spawn(
        "VPDU",
        Box::new(VpduDriver::new(peer.addr.clone())),
        Vec::new(),
        PduOptions::default(),
    );
    report("vpdu PduHandle", layer_roundtrip(&pdu, "4", n).await);
    pdu.stop().await;
    drop(peer);

    let agent = Snmpd::start().unwrap_or_else(|e| panic!("snmpd peer: {e}"));
    let config = serde_json::json!({
        "hostname": agent.address(), "community": "private", "state_transition_delay": 0,
    });
    let d = SnmpDriver::model(&APC_MASTERSWITCH, &config).unwrap();
    d.ports().await.unwrap();
    driver_roundtrip(&d, "3", 10).await; // warm-up
    report("snmpd (APC) driver", driver_roundtrip(&d, "3", n / 2).await);
    let pdu = PduHandle::spawn(
        "APC",
        Box::new(SnmpDriver::model(&APC_MASTERSWITCH, &config).unwrap()),
        Vec::new(),
        PduOptions::default(),
    );
    report(
        "snmpd (APC) PduHandle",
        layer_roundtrip(&pdu, "5", n / 2).await,
    );
    pdu.stop().await;
}
