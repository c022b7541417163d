//! The executor's console sources: the SALAD client against our multiplexer
//! and against the reference SALAD from PyPI, and the in-process source.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use vivian_core::console::{ConsoleError, ConsoleSource, LineSplitter, ResetOutcome};
use vivian_salad::{InProcessConsoles, SaladClient};

/// Read console lines from an attachment until one contains `needle`.
async fn lines_until(
    r: &mut vivian_core::console::ConsoleReader,
    splitter: &mut LineSplitter,
    needle: &[u8],
) -> Vec<Vec<u8>> {
    let mut lines = Vec::new();
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let n = tokio::time::timeout_at(deadline, r.read(&mut buf))
            .await
            .expect("timed out reading the console")
            .unwrap();
        assert!(n > 0, "console closed early; lines so far {lines:?}");
        let mut found = false;
        splitter.push(&buf[..n], |l| {
            found |= l.bytes.windows(needle.len()).any(|w| w == needle);
            lines.push(l.bytes.to_vec());
        });
        if found {
            return lines;
        }
    }
}

#[tokio::test]
async fn salad_client_against_our_salad() {
    let t = TestSalad::start(None).await;
    let mut dut = TcpStream::connect(t.netconsole()).await.unwrap();
    dut.write_all(b"iPXE 1.21\r\nSALAD.machine_id=52:54:00:aa:bb:cc\r\nearly\r\n")
        .await
        .unwrap();
    t.wait_for("binding", |s| {
        s.consoles().iter().any(|c| c.machine_id.is_some())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(50)).await;

    let client: Arc<dyn ConsoleSource> = Arc::new(SaladClient::new(&t.url).unwrap());
    let machines = client.machines().await.unwrap();
    assert_eq!(machines.len(), 1);
    assert_eq!(machines[0].id, "52:54:00:aa:bb:cc");

    let mut att = client.attach("52:54:00:aa:bb:cc").await.unwrap();
    let start = att
        .start_offset
        .expect("our salad reports the start offset");
    assert!(
        client
            .machine("52:54:00:aa:bb:cc")
            .await
            .unwrap()
            .has_client
    );

    // A second read-write attachment is refused.
    match client.attach("52:54:00:aa:bb:cc").await {
        Err(ConsoleError::Busy { message, .. }) => {
            assert!(
                message.contains("A client is already connected"),
                "{message}"
            )
        }
        other => panic!("expected Busy, got {other:?}"),
    }

    // Console output, split into lines that keep their \r\n; a line cut
    // across TCP segments is not lost.
    dut.write_all(b"[    1.000000] Linux ver").await.unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    dut.write_all(b"sion\r\n[    2.000000] reboot: Power Down\r\n")
        .await
        .unwrap();
    let mut splitter = LineSplitter::default();
    let lines = lines_until(&mut att.reader, &mut splitter, b"Power Down").await;
    assert_eq!(
        lines,
        vec![
            b"[    1.000000] Linux version\r\n".to_vec(),
            b"[    2.000000] reboot: Power Down\r\n".to_vec()
        ]
    );

    // Keystrokes reach the DUT.
    att.writer.write_all(b"\x03reboot\n").await.unwrap();
    assert_eq!(read_until(&mut dut, b"reboot\n").await, b"\x03reboot\n");

    // What was printed before we attached is in the log, up to our start.
    let missed = client
        .read_log("52:54:00:aa:bb:cc", 0, start as usize)
        .await
        .unwrap();
    assert_eq!(
        missed.data,
        b"iPXE 1.21\r\nSALAD.machine_id=52:54:00:aa:bb:cc\r\nearly\r\n"
    );
    assert!(missed.size >= start);

    // Reset of a netconsole is impossible (501 from the service).
    match client.reset("52:54:00:aa:bb:cc").await.unwrap() {
        ResetOutcome::Unsupported(m) => assert_eq!(m, "Reset unsupported on this console"),
        other => panic!("unexpected {other:?}"),
    }
    // An id the service refuses.
    assert!(matches!(
        client.machine("bad id").await,
        Err(ConsoleError::InvalidMachineId { .. })
    ));

    // Detaching frees the read-write slot.
    drop(att);
    t.wait_for("detached", |s| {
        !s.machine("52:54:00:aa:bb:cc").unwrap().has_client
    })
    .await;
    let att = client.attach("52:54:00:aa:bb:cc").await.unwrap();
    assert!(att.start_offset.unwrap() > start);

    // An unreachable service is named in the error.
    let gone = SaladClient::new("http://127.0.0.1:9").unwrap();
    let e = gone.machines().await.unwrap_err();
    assert!(e.to_string().contains("http://127.0.0.1:9"), "{e}");
    assert!(SaladClient::new("ftp://x").is_err());
    t.salad.shutdown().await;
}

#[tokio::test]
async fn in_process_source_attaches_in_memory() {
    let t = TestSalad::start(None).await;
    let consoles: Arc<dyn ConsoleSource> = Arc::new(InProcessConsoles::new(t.salad.clone()));

    // A simulated DUT handed over as an in-memory stream.
    let (dut_side, salad_side) = tokio::io::duplex(1 << 16);
    t.salad.add_stream_console("sim-dut-1", salad_side).unwrap();
    let (mut dut_r, mut dut_w) = tokio::io::split(dut_side);
    dut_w
        .write_all(b"bios\r\nSALAD.machine_id=sim1\r\n")
        .await
        .unwrap();
    t.wait_for("binding", |s| {
        s.consoles().iter().any(|c| c.machine_id.is_some())
    })
    .await;

    let mut att = consoles.attach("sim1").await.unwrap();
    let start = att.start_offset.unwrap();
    assert_eq!(start, b"bios\r\nSALAD.machine_id=sim1\r\n".len() as u64);
    assert!(matches!(
        consoles.attach("sim1").await,
        Err(ConsoleError::Busy { .. })
    ));
    assert!(consoles.machine("sim1").await.unwrap().has_client);

    dut_w.write_all(b"kernel\r\nSALAD.ping\r\n").await.unwrap();
    let got = read_until(&mut att.reader, b"SALAD.ping\r\n").await;
    assert_eq!(got, b"kernel\r\nSALAD.ping\r\n");
    assert_eq!(
        read_until(&mut dut_r, b"SALAD.pong\n").await,
        b"SALAD.pong\n"
    );

    att.writer.write_all(b"input\n").await.unwrap();
    assert_eq!(read_until(&mut dut_r, b"input\n").await, b"input\n");

    let log = consoles.read_log("sim1", 0, 1 << 20).await.unwrap();
    assert_eq!(
        log.data,
        b"bios\r\nSALAD.machine_id=sim1\r\nkernel\r\nSALAD.ping\r\n"
    );

    // An observer on the TCP read-only port sees the same stream.
    let m = consoles.machine("sim1").await.unwrap();
    let mut ro = t.connect(m.tcp_port_logs as u64).await;
    t.wait_for("observer", |s| s.clients("sim1").unwrap().1.len() == 2)
        .await;
    dut_w.write_all(b"both\n").await.unwrap();
    assert_eq!(read_until(&mut ro, b"both\n").await, b"both\n");
    assert_eq!(read_until(&mut att.reader, b"both\n").await, b"both\n");

    match consoles.reset("sim1").await.unwrap() {
        ResetOutcome::Unsupported(_) => {}
        other => panic!("unexpected {other:?}"),
    }

    // Dropping the attachment frees the slot; shutdown ends the stream.
    drop(att);
    assert!(!consoles.machine("sim1").await.unwrap().has_client);
    let mut att = consoles.attach("sim1").await.unwrap();
    t.salad.shutdown().await;
    assert_eq!(read_to_eof(&mut att.reader).await, b"");
}

// ---- The reference SALAD from PyPI ----

const REF_VENV: &str = "/var/tmp/vivian-salad-ref";
const REF_NETCONSOLE_PORT: u16 = 8006;

/// Serializes users of the reference's fixed netconsole port 8006 across
/// test processes.
struct PortLock {
    _file: std::fs::File,
}

impl PortLock {
    fn take() -> Self {
        use std::os::fd::AsRawFd;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open("/tmp/vivian-salad-ref-8006.lock")
            .unwrap();
        // SAFETY: flock on a file descriptor we own.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(rc, 0, "flock failed");
        PortLock { _file: f }
    }
}

fn python312() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/root/.pyenv/versions")
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("3.12."))
                })
                .map(|p| p.join("bin/python3"))
                .filter(|p| p.exists())
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found.pop().expect(
        "the reference salad needs Python 3.12: none found under /root/.pyenv/versions/3.12.*",
    )
}

/// The venv with `valve-gfx-ci.salad` 0.0.2, created on first use (under
/// the port lock, so one process at a time). A marker file written after a
/// successful install tells a complete venv from one left half-made by an
/// interrupted run, which is removed and made again.
fn reference_salad() -> PathBuf {
    let venv = Path::new(REF_VENV);
    let salad = venv.join("bin/salad");
    let marker = venv.join(".vivian-ready");
    if marker.exists() && salad.exists() {
        return salad;
    }
    let _ = std::fs::remove_dir_all(venv);
    let ok = Command::new(python312())
        .args(["-m", "venv", REF_VENV])
        .status()
        .expect("running python3.12 -m venv")
        .success();
    assert!(ok, "creating the venv {REF_VENV} failed");
    let ok = Command::new(venv.join("bin/python3"))
        .args(["-m", "pip", "install", "-q", "valve-gfx-ci.salad==0.0.2"])
        .status()
        .expect("running pip in the venv")
        .success();
    assert!(ok, "pip install valve-gfx-ci.salad==0.0.2 failed");
    assert!(
        salad.exists(),
        "{} missing after pip install",
        salad.display()
    );
    std::fs::write(&marker, b"valve-gfx-ci.salad==0.0.2\n").unwrap();
    salad
}

struct RefSalad {
    child: Child,
    url: String,
}

impl Drop for RefSalad {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_reference() -> RefSalad {
    let bin = tokio::task::spawn_blocking(reference_salad).await.unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(bin)
        .env("SALAD_PORT", port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the reference salad");
    let mut r = RefSalad {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    for _ in 0..300 {
        if let Some(status) = r.child.try_wait().unwrap() {
            let mut err = String::new();
            r.child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("the reference salad exited ({status}) at start; is port {REF_NETCONSOLE_PORT} in use? {err}");
        }
        if let Ok(resp) = reqwest::get(format!("{}/api/v1/machine", r.url)).await {
            if resp.status().is_success() {
                return r;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "the reference salad did not answer on {} within 15 s",
        r.url
    );
}

#[tokio::test]
async fn salad_client_against_reference_salad() {
    let _lock = tokio::task::spawn_blocking(PortLock::take).await.unwrap();
    let r = start_reference().await;
    let client = SaladClient::new(&r.url).unwrap();

    let mut dut = TcpStream::connect(("127.0.0.1", REF_NETCONSOLE_PORT))
        .await
        .expect("the reference netconsole port 8006");
    dut.write_all(b"SALAD.ping\r\n").await.unwrap();
    assert_eq!(read_until(&mut dut, b"SALAD.pong\n").await, b"SALAD.pong\n");
    dut.write_all(b"SALAD.machine_id=ref-m1\n").await.unwrap();
    let mut bound = false;
    for _ in 0..200 {
        if client
            .machines()
            .await
            .unwrap()
            .iter()
            .any(|m| m.id == "ref-m1")
        {
            bound = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(bound, "the reference never listed ref-m1");

    let m = client.machine("ref-m1").await.unwrap();
    assert!(!m.has_client);
    let mut att = client.attach("ref-m1").await.unwrap();
    assert_eq!(att.start_offset, None, "the reference keeps no log");
    // The reference registers the client asynchronously.
    for _ in 0..200 {
        if client.machine("ref-m1").await.unwrap().has_client {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(client.machine("ref-m1").await.unwrap().has_client);

    dut.write_all(b"hello from the dut\r\n").await.unwrap();
    let got = read_until(&mut att.reader, b"hello from the dut\r\n").await;
    assert!(got.ends_with(b"hello from the dut\r\n"), "{got:?}");
    att.writer.write_all(b"keys\n").await.unwrap();
    assert_eq!(read_until(&mut dut, b"keys\n").await, b"keys\n");

    // A second client: refused (has_client), as by our salad.
    assert!(matches!(
        client.attach("ref-m1").await,
        Err(ConsoleError::Busy { .. })
    ));
    // The raw refusal message is the one our salad sends too.
    let mut second = TcpStream::connect(("127.0.0.1", m.tcp_port)).await.unwrap();
    assert_eq!(
        read_to_eof(&mut second).await,
        b"ERROR: A client is already connected, re-try later!\r\n"
    );

    match client.reset("ref-m1").await.unwrap() {
        ResetOutcome::Unsupported(msg) => assert_eq!(msg, "Reset unsupported on this console"),
        other => panic!("unexpected {other:?}"),
    }
    assert!(matches!(
        client.read_log("ref-m1", 0, 10).await,
        Err(ConsoleError::NotSupported { .. })
    ));

    // Same JSON shape (keys and their order) as ours.
    let body = reqwest::get(format!("{}/api/v1/machine/ref-m1", r.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
    assert_eq!(keys, ["id", "tcp_port", "has_client", "tcp_port_logs"]);
    drop(att);
    drop(dut);
}
