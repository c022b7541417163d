//! The stock binaries wired together as an operator would: `salad`, `vpdu`
//! with simulated DUTs, `executor` on a MarsDB file, and a job submitted
//! with `executorctl`, which exits with the job's verdict.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Kills the child when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn bin(name: &str) -> PathBuf {
    // The binaries of the `vivian` package, built next to this test.
    let mut p = std::env::current_exe().unwrap();
    p.pop();
    if p.ends_with("deps") {
        p.pop();
    }
    let p = p.join(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace (cargo test --workspace builds it)",
        p.display()
    );
    p
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_http(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(r) = reqwest::blocking::get(url) {
            if r.status().is_success() {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{url} never answered");
}

/// Serves `dir` over HTTP on 127.0.0.1 (the job's kernel and initrd).
fn serve_files(dir: &Path) -> (u16, Proc) {
    let port = free_port();
    let child = Command::new("python3")
        .args([
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            &port.to_string(),
        ])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 runs");
    (port, Proc(child))
}

#[test]
fn executorctl_runs_a_job_through_salad_vpdu_and_executor() {
    let dir = tempfile::tempdir().unwrap();
    let files = dir.path().join("files");
    std::fs::create_dir(&files).unwrap();
    std::fs::write(files.join("kernel"), "#!vivian-sim\nprint kernel up\n").unwrap();
    std::fs::write(files.join("initrd"), "initrd").unwrap();
    let (files_port, _files) = serve_files(&files);
    wait_http(&format!("http://127.0.0.1:{files_port}/initrd"));

    let salad_port = free_port();
    let netconsole_port = free_port();
    let exec_port = free_port();

    let salad = Proc(
        Command::new(bin("salad"))
            .env("SALAD_PORT", salad_port.to_string())
            .env("SALAD_TCPCONSOLE_PORT", netconsole_port.to_string())
            .env("SALAD_LOG_DIR", dir.path().join("consoles"))
            .env("SALAD_SERIAL_GLOBS", "")
            .env("SALAD_TCPCONSOLE_HOST", "127.0.0.1")
            .env("SALAD_MACHINE_HOST", "127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("salad starts"),
    );
    wait_http(&format!("http://127.0.0.1:{salad_port}/api/v1/machine"));

    let mut vpdu = Proc(
        Command::new(bin("vpdu"))
            .args(["--host", "127.0.0.1", "--port", "0", "--num-ports", "2"])
            .args(["--salad-console-port", &netconsole_port.to_string()])
            .args(["--executor-url", &format!("http://127.0.0.1:{exec_port}")])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("vpdu starts"),
    );
    let mut line = String::new();
    BufReader::new(vpdu.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let vpdu_addr = line
        .split_whitespace()
        .nth(3)
        .unwrap_or_else(|| panic!("unexpected vpdu banner {line:?}"))
        .to_string();

    let db = dir.path().join("mars_db.yaml");
    std::fs::write(
        &db,
        format!(
            "pdus:\n  VPDU:\n    driver: vpdu\n    config:\n      hostname: {vpdu_addr}\nduts:\n  52:54:00:11:22:01:\n    base_name: sim\n    ip_address: 127.0.0.1\n    tags: [sim]\n    pdu: VPDU\n    pdu_port_id: '1'\n    pdu_off_delay: 0.1\n    ready_for_service: true\n"
        ),
    )
    .unwrap();
    let _executor = Proc(
        Command::new(bin("executor"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("FARM_NAME", "e2e")
            .env("MARS_DB_FILE", &db)
            .env("EXECUTOR_HOST", "127.0.0.1")
            .env("EXECUTOR_PORT", exec_port.to_string())
            .env("SALAD_URL", format!("http://127.0.0.1:{salad_port}"))
            .env("BOOTS_DISABLE_SERVERS", "1")
            .env("SERGENT_HARTMAN_QUICK_CHECK", "disabled")
            .env("GITLAB_CONF_FILE", dir.path().join("gitlab-runner.toml"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("executor starts"),
    );
    let api = format!("http://127.0.0.1:{exec_port}");
    // Ready when the DUT is IDLE (its PDU answered).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let state = reqwest::blocking::get(format!("{api}/api/v1/dut/52:54:00:11:22:01"))
            .ok()
            .and_then(|r| r.json::<serde_json::Value>().ok())
            .map(|v| v["state"].clone());
        if state.as_ref().is_some_and(|s| s == "IDLE") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the DUT never became IDLE: {state:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let files_url = format!("http://127.0.0.1:{files_port}");
    let job = dir.path().join("job.yml");
    std::fs::write(
        &job,
        format!(
            r#"version: 1
target: {{tags: [sim]}}
timeouts:
  overall: {{minutes: 1}}
console_patterns:
  session_end: {{regex: "reboot: Power down"}}
  job_success: {{regex: "^RESULT=ok"}}
deployment:
  start:
    kernel:
      url: "{files_url}/kernel"
      cmdline: ["SALAD.machine_id={{{{ machine_id }}}}", 'vivian.cmd="print RESULT=ok"', "vivian.cmd=poweroff"]
    initramfs:
      url: "{files_url}/initrd"
"#
        ),
    )
    .unwrap();
    let out = Command::new(bin("executorctl"))
        .args(["-e", &api, "run"])
        .arg(&job)
        .stdin(Stdio::null())
        .output()
        .expect("executorctl runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "executorctl must exit 0 (PASS)\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("kernel up"), "{stdout}");
    assert!(stdout.contains("RESULT=ok"), "{stdout}");
    // The job log is next to MarsDB.
    assert_eq!(
        std::fs::read_dir(dir.path().join("job_logs"))
            .unwrap()
            .count(),
        1
    );
    drop(salad);
}
