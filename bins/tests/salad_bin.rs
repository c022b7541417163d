//! The `salad` binary: environment configuration and systemd socket
//! activation of its HTTP API (started by `systemd-socket-activate` on the
//! first connection), with a netconsole bound to a machine end to end.

mod process_support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use process_support::{free_port, Proc};

fn http_get(port: u16, path: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn salad_binary_is_socket_activated_and_binds_netconsoles() {
    let http = free_port();
    let netconsole = free_port();
    let logs = tempfile::tempdir().unwrap();
    let child = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(format!("127.0.0.1:{http}"))
        .arg("--fdname=http_ipv4")
        .arg(format!("-ESALAD_TCPCONSOLE_PORT={netconsole}"))
        .arg("-ESALAD_TCPCONSOLE_HOST=127.0.0.1")
        .arg("-ESALAD_MACHINE_HOST=127.0.0.1")
        .arg("-ESALAD_SERIAL_GLOBS=")
        .arg(format!("-ESALAD_LOG_DIR={}", logs.path().display()))
        .arg(env!("CARGO_BIN_EXE_salad"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("systemd-socket-activate (Debian package systemd) is needed");
    let _guard = Proc(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", http)).is_err() {
        assert!(
            Instant::now() < deadline,
            "systemd-socket-activate never listened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The first connection starts salad on the inherited socket.
    let resp = http_get(http, "/api/v1/machine");
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.ends_with(r#"{"machines":{}}"#), "{resp}");

    // A netconsole binds to a machine, whose console lands in the log dir.
    let mut dut = TcpStream::connect(("127.0.0.1", netconsole)).unwrap();
    dut.write_all(b"SALAD.machine_id=binm\nhello\n").unwrap();
    let log = logs.path().join("binm.log");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let resp = http_get(http, "/api/v1/machine");
        if resp.contains("\"binm\"")
            && std::fs::read(&log).unwrap_or_default() == b"SALAD.machine_id=binm\nhello\n"
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "machine not bound or log not written: {resp}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The command line: `--version` names the program and version, `--help`
/// the variables, anything else is refused with exit status 2 and the usage
/// (a mistyped option is not silently ignored).
#[test]
fn salad_command_line() {
    let run = |arg: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_salad"))
            .arg(arg)
            .output()
            .expect("run salad")
    };
    let v = run("--version");
    assert!(v.status.success());
    assert_eq!(
        String::from_utf8_lossy(&v.stdout).trim(),
        format!("salad (vivian) {}", env!("CARGO_PKG_VERSION"))
    );
    let h = run("--help");
    assert!(h.status.success());
    assert!(String::from_utf8_lossy(&h.stdout).contains("SALAD_SERIAL_GLOBS"));
    let bad = run("--port=8005");
    assert_eq!(bad.status.code(), Some(2));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("unexpected argument \"--port=8005\"") && err.contains("usage: salad"),
        "{err}"
    );
}
