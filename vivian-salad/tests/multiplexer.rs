//! The multiplexer against real peers: TCP netconsoles, socat pseudo-terminal
//! pairs as serial ports, TCP clients on the machines' ports, the HTTP API.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BUSY: &[u8] = b"ERROR: A client is already connected, re-try later!\r\n";

#[tokio::test]
async fn netconsole_ping_binding_and_clients() {
    let t = TestSalad::start(None).await;
    let mut dut = TcpStream::connect(t.netconsole()).await.unwrap();

    // Ping, with garbage before it, answered on the console itself.
    dut.write_all(b"\x00\xfcSALAD.ping\r\n").await.unwrap();
    let pong = read_until(&mut dut, b"SALAD.pong\n").await;
    assert_eq!(pong, b"SALAD.pong\n");

    // Early output, then the binding line split over two writes.
    dut.write_all(b"firmware banner\r\nSALAD.machine_")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    dut.write_all(b"id=52:54:00:00:00:01 console=ttyS0\r\n")
        .await
        .unwrap();
    t.wait_for("binding", |s| {
        s.consoles()
            .iter()
            .any(|c| c.machine_id.as_deref() == Some("52:54:00:00:00:01"))
    })
    .await;

    let m = t.machine("52:54:00:00:00:01").await;
    let keys: Vec<&str> = m.as_object().unwrap().keys().map(|k| k.as_str()).collect();
    assert_eq!(keys, ["id", "tcp_port", "has_client", "tcp_port_logs"]);
    assert_eq!(m["has_client"], false);
    let (rw_port, ro_port) = (
        m["tcp_port"].as_u64().unwrap(),
        m["tcp_port_logs"].as_u64().unwrap(),
    );
    assert_ne!(rw_port, ro_port);

    let mut rw = t.connect(rw_port).await;
    let mut ro1 = t.connect(ro_port).await;
    let mut ro2 = t.connect(ro_port).await;
    t.wait_for("three clients", |s| {
        s.clients("52:54:00:00:00:01").unwrap().1.len() == 3
    })
    .await;
    assert_eq!(t.machine("52:54:00:00:00:01").await["has_client"], true);

    // A second read-write client is refused with the reference's message.
    let mut rw2 = t.connect(rw_port).await;
    assert_eq!(read_to_eof(&mut rw2).await, BUSY);

    // Console output reaches every client, raw.
    let out = b"Linux version 6.1\r\n\x00\xff binary\n";
    dut.write_all(out).await.unwrap();
    for c in [&mut rw, &mut ro1, &mut ro2] {
        assert_eq!(
            read_exact_within(c, out.len(), Duration::from_secs(5)).await,
            out
        );
    }

    // Input of the read-write client reaches the console; a read-only
    // client's input does not.
    ro1.write_all(b"ignored").await.unwrap();
    rw.write_all(b"root\n").await.unwrap();
    assert_eq!(
        read_exact_within(&mut dut, 5, Duration::from_secs(5)).await,
        b"root\n"
    );
    let mut extra = [0u8; 16];
    assert!(
        tokio::time::timeout(Duration::from_millis(200), dut.read(&mut extra))
            .await
            .is_err()
    );

    // When the read-write client leaves, another may come.
    drop(rw);
    t.wait_for("rw client gone", |s| {
        !s.machine("52:54:00:00:00:01").unwrap().has_client
    })
    .await;
    let mut rw3 = t.connect(rw_port).await;
    dut.write_all(b"again\n").await.unwrap();
    assert_eq!(
        read_exact_within(&mut rw3, 6, Duration::from_secs(5)).await,
        b"again\n"
    );

    // The log holds everything since the first byte of the console,
    // including the ping and what came before the binding line.
    let (s, _) = t
        .get_json("/api/v1/machine/52:54:00:00:00:01/clients")
        .await;
    assert_eq!(s, 200);
    let log = reqwest::get(format!("{}/api/v1/machine/52:54:00:00:00:01/log", t.url))
        .await
        .unwrap();
    assert_eq!(log.status(), 200);
    let size: u64 = log.headers()["x-salad-log-size"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let body = log.bytes().await.unwrap();
    let mut expected = Vec::new();
    expected.extend_from_slice(b"\x00\xfcSALAD.ping\r\nfirmware banner\r\nSALAD.machine_id=52:54:00:00:00:01 console=ttyS0\r\n");
    expected.extend_from_slice(out);
    expected.extend_from_slice(b"again\n");
    assert_eq!(body.as_ref(), expected.as_slice());
    assert_eq!(size, expected.len() as u64);
    t.salad.shutdown().await;
}

#[tokio::test]
async fn clients_can_fetch_what_they_missed() {
    let t = TestSalad::start(None).await;
    let mut dut = TcpStream::connect(t.netconsole()).await.unwrap();
    dut.write_all(b"SALAD.machine_id=m-missed\nline 1\nline 2\n")
        .await
        .unwrap();
    t.wait_for("binding", |s| {
        s.consoles().iter().any(|c| c.machine_id.is_some())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(50)).await;

    let m = t.machine("m-missed").await;
    let mut rw = t.connect(m["tcp_port"].as_u64().unwrap()).await;
    let local = rw.local_addr().unwrap().to_string();
    let mut start = None;
    for _ in 0..100 {
        let (_, v) = t.get_json("/api/v1/machine/m-missed/clients").await;
        if let Some(c) = v["clients"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["peer"] == local.as_str())
        {
            assert_eq!(c["rw"], true);
            start = Some(c["start_offset"].as_u64().unwrap());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let start = start.expect("our connection is listed with its start offset");
    dut.write_all(b"line 3\n").await.unwrap();
    let live = read_exact_within(&mut rw, 7, Duration::from_secs(5)).await;
    let missed = reqwest::get(format!(
        "{}/api/v1/machine/m-missed/log?offset=0&length={start}",
        t.url
    ))
    .await
    .unwrap()
    .bytes()
    .await
    .unwrap();
    let mut all = missed.to_vec();
    all.extend_from_slice(&live);
    assert_eq!(all, b"SALAD.machine_id=m-missed\nline 1\nline 2\nline 3\n");

    // Offsets and lengths select a slice; bad queries are named.
    let part = reqwest::get(format!(
        "{}/api/v1/machine/m-missed/log?offset=26&length=6",
        t.url
    ))
    .await
    .unwrap();
    assert_eq!(part.headers()["x-salad-log-offset"], "26");
    assert_eq!(part.bytes().await.unwrap().as_ref(), b"line 1");
    let (s, v) = t.get_json("/api/v1/machine/m-missed/log?offset=-1").await;
    assert_eq!(s, 400);
    assert!(v["error"].as_str().unwrap().contains("offset"), "{v}");
    let (s, _) = t.get_json("/api/v1/machine/never-seen/log").await;
    assert_eq!(s, 404);
    t.salad.shutdown().await;
}

#[tokio::test]
async fn http_api_errors_and_reset() {
    let t = TestSalad::start(None).await;
    let (s, v) = t.get_json("/api/v1/machine").await;
    assert_eq!(s, 200);
    assert_eq!(v, serde_json::json!({"machines": {}}));

    // GET creates the machine, as the reference does.
    let m = t.machine("created-by-api").await;
    assert_eq!(m["id"], "created-by-api");
    let (_, v) = t.get_json("/api/v1/machine").await;
    assert_eq!(v["machines"]["created-by-api"], m);

    // Bad ids are refused with a JSON error naming the problem.
    let (s, v) = t.get_json("/api/v1/machine/a%20b").await;
    assert_eq!(s, 400);
    assert!(v["error"].as_str().unwrap().contains("a b"), "{v}");

    let client = reqwest::Client::new();
    let reset = |id: &str| {
        client
            .post(format!("{}/api/v1/machine/{id}/reset", t.url))
            .send()
    };
    let r = reset("created-by-api").await.unwrap();
    assert_eq!(r.status(), 501);
    assert_eq!(r.text().await.unwrap(), "No console associated");

    let mut dut = TcpStream::connect(t.netconsole()).await.unwrap();
    dut.write_all(b"SALAD.machine_id=netdut\n").await.unwrap();
    t.wait_for("binding", |s| {
        s.consoles().iter().any(|c| c.machine_id.is_some())
    })
    .await;
    let r = reset("netdut").await.unwrap();
    assert_eq!(r.status(), 501);
    assert_eq!(r.text().await.unwrap(), "Reset unsupported on this console");

    let (s, _) = t.get_json("/api/v1/nothing").await;
    assert_eq!(s, 404);
    t.salad.shutdown().await;
}

#[tokio::test]
async fn netconsole_reconnect_keeps_machine_and_clients() {
    let t = TestSalad::start(None).await;
    let m = t.machine("vm1").await;
    let mut rw = t.connect(m["tcp_port"].as_u64().unwrap()).await;
    let mut ro = t.connect(m["tcp_port_logs"].as_u64().unwrap()).await;
    t.wait_for("clients", |s| s.clients("vm1").unwrap().1.len() == 2)
        .await;

    for round in 0..3 {
        let mut dut = TcpStream::connect(t.netconsole()).await.unwrap();
        let text = format!("SALAD.machine_id=vm1\nboot {round}\n");
        dut.write_all(text.as_bytes()).await.unwrap();
        for c in [&mut rw, &mut ro] {
            let got = read_exact_within(c, text.len(), Duration::from_secs(5)).await;
            assert_eq!(got, text.as_bytes());
        }
        // Input goes to the current connection of the machine's console.
        rw.write_all(format!("keys {round}\n").as_bytes())
            .await
            .unwrap();
        let got = read_until(&mut dut, format!("keys {round}\n").as_bytes()).await;
        assert_eq!(got, format!("keys {round}\n").as_bytes());
        drop(dut);
        t.wait_for("console closed", |s| s.consoles().is_empty())
            .await;
    }
    let m2 = t.machine("vm1").await;
    assert_eq!(m2["tcp_port"], m["tcp_port"]);
    assert_eq!(m2["has_client"], true);
    t.salad.shutdown().await;
}

#[tokio::test]
async fn serial_ports_hot_plug_ping_and_binding_survives_replug() {
    let dir = tempfile::tempdir().unwrap();
    let t = TestSalad::start(Some(&dir.path().join("ttySALAD*"))).await;

    let pty = PtyPair::start(dir.path(), 0);
    let port_name = pty.salad_end.display().to_string();
    // Picked up within a second.
    t.wait_for("serial port found", |s| {
        s.consoles().iter().any(|c| c.name == port_name)
    })
    .await;

    let mut dut = pty.open_dut();
    dut.write_all(b"junk\x00SALAD.ping\n").await.unwrap();
    assert_eq!(read_until(&mut dut, b"SALAD.pong\n").await, b"SALAD.pong\n");
    dut.write_all(b"SALAD.machine_id=serialdut\n")
        .await
        .unwrap();
    t.wait_for("bound", |_| {
        t.console_machine("ttySALAD0") == Some(Some("serialdut".into()))
    })
    .await;
    let m = t.machine("serialdut").await;
    let mut rw = t.connect(m["tcp_port"].as_u64().unwrap()).await;
    t.wait_for("client", |s| s.machine("serialdut").unwrap().has_client)
        .await;
    dut.write_all(b"first life\n").await.unwrap();
    assert_eq!(read_until(&mut rw, b"first life\n").await, b"first life\n");

    // Hot-unplug: the console goes away within a second; the client stays.
    drop(dut);
    pty.unplug();
    t.wait_for("serial port removed", |s| {
        !s.consoles().iter().any(|c| c.name == port_name)
    })
    .await;

    // Replug at the same place: bound to the same machine without a
    // SALAD.machine_id line, and the client still receives.
    let pty = PtyPair::start(dir.path(), 0);
    t.wait_for("serial port back and bound", |_| {
        t.console_machine("ttySALAD0") == Some(Some("serialdut".into()))
    })
    .await;
    let mut dut = pty.open_dut();
    dut.write_all(b"second life\n").await.unwrap();
    assert_eq!(
        read_until(&mut rw, b"second life\n").await,
        b"second life\n"
    );
    rw.write_all(b"typed\n").await.unwrap();
    assert_eq!(read_until(&mut dut, b"typed\n").await, b"typed\n");
    drop(dut);
    drop(pty);
    t.salad.shutdown().await;
}

/// A symbolic link at `link` to the device of `pty`'s multiplexer end, as
/// udev makes them in `/dev/serial/by-id`; its path, which names the
/// console.
fn link_to(pty: &PtyPair, link: &std::path::Path) -> String {
    std::os::unix::fs::symlink(std::fs::canonicalize(&pty.salad_end).unwrap(), link).unwrap();
    link.display().to_string()
}

/// Ports plugged in are found as their directory changes, not at the next
/// periodic scan: with a one-minute scan interval, a port appears within
/// seconds, also in a directory that did not exist when the multiplexer
/// started (`/dev/serial/by-id` before the first USB adapter), and its
/// removal is noticed as fast.
#[tokio::test]
async fn hot_plug_is_seen_through_directory_changes() {
    let dir = tempfile::tempdir().unwrap();
    let by_id = dir.path().join("serial/by-id");
    let t = TestSalad::start_scanning(Some(&by_id.join("*")), Duration::from_secs(60)).await;
    // Past the scan at start-up.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let pty = PtyPair::start(dir.path(), 0);
    std::fs::create_dir_all(&by_id).unwrap();
    let name = link_to(&pty, &by_id.join("usb-FTDI_0"));
    t.wait_for("port found without a periodic scan", |s| {
        s.consoles().iter().any(|c| c.name == name)
    })
    .await;
    let mut dut = pty.open_dut();
    dut.write_all(b"SALAD.ping\n").await.unwrap();
    assert_eq!(read_until(&mut dut, b"SALAD.pong\n").await, b"SALAD.pong\n");

    // A second port in the now watched directory.
    let second = PtyPair::start(dir.path(), 1);
    let link2 = by_id.join("usb-FTDI_1");
    let name2 = link_to(&second, &link2);
    t.wait_for("second port found", |s| {
        s.consoles().iter().any(|c| c.name == name2)
    })
    .await;

    // Unplugged: the link goes, so does the console (the pty itself
    // stays open here, so only the directory change can tell).
    std::fs::remove_file(&link2).unwrap();
    t.wait_for("second port removed", |s| {
        !s.consoles().iter().any(|c| c.name == name2)
    })
    .await;
    drop((dut, pty, second));
    t.salad.shutdown().await;
}

/// A matched path that comes to name another device (udev re-points a
/// `by-path` link after a replug) is a new port: the multiplexer drops the
/// console on the old device, though that device still works, and opens
/// the new one.
#[tokio::test]
async fn a_link_repointed_at_another_device_is_reopened() {
    let dir = tempfile::tempdir().unwrap();
    let by_path = dir.path().join("by-path");
    std::fs::create_dir(&by_path).unwrap();
    let t = TestSalad::start(Some(&by_path.join("*"))).await;
    let a = PtyPair::start(dir.path(), 0);
    let b = PtyPair::start(dir.path(), 1);
    let link = by_path.join("port0");
    let name = link_to(&a, &link);
    t.wait_for("port found", |s| {
        s.consoles().iter().any(|c| c.name == name)
    })
    .await;
    let mut dut_a = a.open_dut();
    dut_a.write_all(b"SALAD.ping\n").await.unwrap();
    assert_eq!(
        read_until(&mut dut_a, b"SALAD.pong\n").await,
        b"SALAD.pong\n"
    );

    // Re-point the link atomically, as udev does.
    let tmp = dir.path().join("port0.new");
    link_to(&b, &tmp);
    std::fs::rename(&tmp, &link).unwrap();
    let mut dut_b = b.open_dut();
    let mut answered = false;
    for _ in 0..50 {
        dut_b.write_all(b"SALAD.ping\n").await.unwrap();
        let mut buf = [0u8; 64];
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(200), dut_b.read(&mut buf)).await
        {
            if buf[..n].windows(11).any(|w| w == b"SALAD.pong\n") {
                answered = true;
                break;
            }
        }
    }
    assert!(answered, "the device the link now names was never opened");
    let same_name = t
        .salad
        .consoles()
        .into_iter()
        .filter(|c| c.name == name)
        .count();
    assert_eq!(
        same_name, 1,
        "the console on the old device was not dropped"
    );
    drop((dut_a, dut_b, a, b));
    t.salad.shutdown().await;
}

/// 10 MB of every byte value through one serial console, byte-exact to a
/// read-write and two read-only clients and to the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_of_10_mb_is_delivered_byte_exact() {
    let dir = tempfile::tempdir().unwrap();
    let t = TestSalad::start(Some(&dir.path().join("ttySALAD*"))).await;
    let pty = PtyPair::start(dir.path(), 1);
    let port_name = pty.salad_end.display().to_string();
    t.wait_for("serial port found", |s| {
        s.consoles().iter().any(|c| c.name == port_name)
    })
    .await;
    let mut dut = pty.open_dut();
    dut.write_all(b"SALAD.machine_id=flood\n").await.unwrap();
    t.wait_for("bound", |_| {
        t.console_machine("ttySALAD1") == Some(Some("flood".into()))
    })
    .await;
    let m = t.machine("flood").await;
    let mut readers = vec![
        t.connect(m["tcp_port"].as_u64().unwrap()).await,
        t.connect(m["tcp_port_logs"].as_u64().unwrap()).await,
        t.connect(m["tcp_port_logs"].as_u64().unwrap()).await,
    ];
    t.wait_for("clients", |s| s.clients("flood").unwrap().1.len() == 3)
        .await;
    let start = t.salad.clients("flood").unwrap().0;

    // Pseudo-random bytes (xorshift), all 256 values, '\n' included.
    const LEN: usize = 10 * 1024 * 1024;
    let mut data = Vec::with_capacity(LEN);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    while data.len() < LEN {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    data.truncate(LEN);
    let expected = std::sync::Arc::new(data);

    let mut tasks = Vec::new();
    for mut r in readers.drain(..) {
        let expected = expected.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = vec![0u8; expected.len()];
            tokio::time::timeout(Duration::from_secs(60), r.read_exact(&mut got))
                .await
                .expect("flood not received in 60 s")
                .unwrap();
            got == *expected
        }));
    }
    let writer = {
        let expected = expected.clone();
        tokio::spawn(async move {
            for chunk in expected.chunks(4096) {
                dut.write_all(chunk).await.unwrap();
            }
            dut
        })
    };
    let _dut = writer.await.unwrap();
    for (i, task) in tasks.into_iter().enumerate() {
        assert!(task.await.unwrap(), "client {i} received different bytes");
    }
    let chunk = t.salad.read_log("flood", start, 16 << 20).await.unwrap();
    assert!(chunk.data == *expected, "the log holds different bytes");
    t.salad.shutdown().await;
}
