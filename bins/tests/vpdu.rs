//! Our `vpdu` driver against our `vpdu` server: the library server on
//! 127.0.0.1 (port 0), and the real binary.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use vivian::vpdu::{DutEvent, DutLog, VpduConfig, VpduServer, VpduServerHandle};
use vivian_core::pdu::{
    PduDriver, PduError, PduHandle, PduManager, PduOptions, PduSpec, PduStatus, PortState,
};
use vivian_pdu::vpdu::{encode, VpduDriver, CMD_COUNT, CMD_ON, CMD_STATUS, MAX_PORT};

async fn server(num_ports: u8) -> (VpduServerHandle, DutLog) {
    let log = DutLog::new();
    let server = VpduServer::bind(
        "127.0.0.1:0",
        VpduConfig {
            num_ports,
            salad_console_port: None,
        },
        log.factory(),
    )
    .await
    .unwrap();
    (server.spawn(), log)
}

/// Sends raw bytes, returns what the server answered before closing.
async fn raw(addr: std::net::SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("the server closes the connection")
        .ok();
    out
}

#[tokio::test]
async fn driver_lists_reads_and_switches_outlets() {
    let (srv, log) = server(4).await;
    let d = VpduDriver::new(srv.addr().to_string());
    let ports = d.ports().await.unwrap();
    let ids: Vec<_> = ports.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(ids, ["0", "1", "2", "3"]);
    assert!(ports.iter().all(|p| p.label.is_none()));
    assert_eq!(d.get_state("2").await.unwrap(), PortState::Off);
    d.set_state("2", PortState::On).await.unwrap();
    assert_eq!(d.get_state("2").await.unwrap(), PortState::On);
    // ON again is acknowledged and starts nothing.
    d.set_state("2", PortState::On).await.unwrap();
    d.set_state("2", PortState::Off).await.unwrap();
    assert_eq!(d.get_state("2").await.unwrap(), PortState::Off);
    assert_eq!(
        log.events(),
        vec![DutEvent::PoweredOn(2), DutEvent::PoweredOff(2)]
    );
    let err = d.get_state("4").await.unwrap_err();
    assert!(err.to_string().contains("out of range"), "{err}");
    assert_eq!(d.default_min_off_time(), Duration::from_millis(100));
    srv.stop().await;
}

#[tokio::test]
async fn reboot_through_the_port_layer_is_off_wait_on() {
    let (srv, log) = server(2).await;
    let pdu = PduHandle::spawn(
        "VPDU",
        Box::new(VpduDriver::new(srv.addr().to_string())),
        Vec::new(),
        PduOptions::default(),
    );
    pdu.set_port_state("1", PortState::On).await.unwrap();
    let t = Instant::now();
    pdu.set_port_state("1", PortState::Reboot).await.unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(100),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(
        log.events(),
        vec![
            DutEvent::PoweredOn(1),
            DutEvent::PoweredOff(1),
            DutEvent::PoweredOn(1)
        ]
    );
    let snap = pdu.snapshot();
    assert_eq!(snap.state, PduStatus::Ok);
    assert_eq!(snap.ports["1"].state, PortState::On);
    assert_eq!(snap.ports["1"].min_off_time, 0.1);
    pdu.stop().await;
    srv.stop().await;
    // Stopping the server switches the outlets OFF.
    assert_eq!(log.events().last(), Some(&DutEvent::PoweredOff(1)));
}

#[tokio::test]
async fn the_manager_builds_vpdu_from_marsdb_entries() {
    let (srv, log) = server(3).await;
    let manager = PduManager::new(
        Arc::new(vivian_pdu::default_registry()),
        PduOptions::default(),
    );
    let spec: PduSpec = serde_json::from_value(serde_json::json!({
        "name": "VPDU", "driver": "vpdu",
        "config": {"hostname": srv.addr().to_string()},
        "reserved_port_ids": ["0"],
    }))
    .unwrap();
    assert!(manager.sync(vec![spec]).await.is_empty());
    let pdu = manager.get("VPDU").unwrap();
    pdu.set_port_state("2", PortState::On).await.unwrap();
    assert!(matches!(
        pdu.set_port_state("0", PortState::On).await,
        Err(PduError::PortReserved { .. })
    ));
    assert_eq!(log.events(), vec![DutEvent::PoweredOn(2)]);
    let json = serde_json::to_value(manager.snapshots()).unwrap();
    assert_eq!(json["VPDU"]["ports"]["2"]["state"], "ON");
    assert_eq!(json["VPDU"]["ports"]["0"]["reserved"], true);
    manager.shutdown().await;
    srv.stop().await;
}

#[tokio::test]
async fn a_dut_that_fails_to_start_reads_unknown_and_fails_the_command() {
    let (srv, log) = server(2).await;
    log.fail_power_on(0);
    let d = VpduDriver::new(srv.addr().to_string());
    let err = d.set_state("0", PortState::On).await.unwrap_err();
    assert!(err.to_string().contains("0x00"), "{err}");
    assert_eq!(d.get_state("0").await.unwrap(), PortState::Unknown);
    srv.stop().await;
}

#[tokio::test]
async fn the_server_survives_any_input() {
    let (srv, _log) = server(4).await;
    let addr = srv.addr();
    // Bits 14-31 set, a port with the count command, ports out of range.
    for word in [
        1u32 << 14,
        u32::MAX,
        encode(3, CMD_COUNT, false),
        encode(4, CMD_ON, false),
        encode(MAX_PORT, CMD_STATUS, false),
    ] {
        assert_eq!(
            raw(addr, &word.to_be_bytes()).await,
            vec![0x00],
            "{word:#x}"
        );
    }
    // Short reads get no answer; extra bytes after the word are ignored.
    assert_eq!(raw(addr, &[]).await, Vec::<u8>::new());
    assert_eq!(raw(addr, &[0, 0, 0]).await, Vec::<u8>::new());
    assert_eq!(raw(addr, &[0, 0, 0, 0, 0xff, 0xff]).await, vec![4]);
    // A client that connects and says nothing does not block the others.
    let _silent = TcpStream::connect(addr).await.unwrap();
    // Pseudo-random words: every one gets exactly one byte.
    let mut x: u32 = 0x1234_5678;
    for _ in 0..300 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let word = x & 0x3fff;
        let reply = raw(addr, &word.to_be_bytes()).await;
        assert_eq!(reply.len(), 1, "{word:#x}");
    }
    let d = VpduDriver::new(addr.to_string());
    assert_eq!(d.ports().await.unwrap().len(), 4);
    srv.stop().await;
}

/// The real binary, killed on drop.
struct VpduProcess {
    child: Child,
    addr: String,
}

impl VpduProcess {
    fn start(extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_vpdu"))
            .args(["--host", "127.0.0.1", "--port", "0"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("vpdu binary starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .split_whitespace()
            .nth(3)
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        Self { child, addr }
    }
}

impl Drop for VpduProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn the_binary_runs_a_command_per_powered_outlet_and_obeys_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let marks = dir.path().join("marks");
    let cmd = format!(
        "echo \"on $VPDU_OUTLET $VPDU_MAC $VPDU_SALAD_CONSOLE_PORT\" >> {m}; trap 'echo off $VPDU_OUTLET >> {m}; exit 0' TERM; sleep 100 & wait",
        m = marks.display()
    );
    let mut vpdu = VpduProcess::start(&[
        "--num-ports",
        "3",
        "--salad-console-port",
        "8100",
        "--dut-command",
        &cmd,
    ]);
    let d = VpduDriver::new(vpdu.addr.clone());
    assert_eq!(d.ports().await.unwrap().len(), 3);
    d.set_state("2", PortState::On).await.unwrap();
    assert_eq!(d.get_state("2").await.unwrap(), PortState::On);
    let read_marks = || std::fs::read_to_string(&marks).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !read_marks().contains("on 2") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(read_marks(), "on 2 52:54:00:11:22:02 8100\n");
    d.set_state("2", PortState::Off).await.unwrap();
    assert_eq!(d.get_state("2").await.unwrap(), PortState::Off);
    // OFF stopped the DUT process (it saw SIGTERM).
    assert_eq!(read_marks(), "on 2 52:54:00:11:22:02 8100\noff 2\n");

    // Bit 13: the server answers, then exits.
    let reply = d.exchange(encode(0, CMD_STATUS, true)).await.unwrap();
    assert_eq!(reply, 0x04);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = vpdu.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "vpdu did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status}");
}

#[test]
fn the_binary_refuses_zero_ports() {
    let out = Command::new(env!("CARGO_BIN_EXE_vpdu"))
        .args(["--host", "127.0.0.1", "--port", "0", "--num-ports", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--num-ports"));
}
