//! `executor demo --once`, the README's first command, runs the sample job
//! to PASS on its virtual farm and exits with executorctl's exit code.

use std::process::Command;

#[test]
fn executor_demo_once_runs_the_sample_job_to_pass() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_executor"))
        .args(["demo", "--once", "--port", "0", "--duts", "2", "--dir"])
        .arg(dir.path())
        .output()
        .expect("executor runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "exit {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    // The console of the DUT was streamed to the terminal, and the verdict.
    assert!(
        stdout.contains("JOB_RESULT=PASS"),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stderr.contains("The job ended with status PASS"),
        "{stderr}"
    );
    // The farm's MarsDB and the job log are in the given folder.
    assert!(dir.path().join("mars_db.yaml").exists());
    let logs = std::fs::read_dir(dir.path().join("jobs")).unwrap().count();
    assert_eq!(logs, 1);
}

#[test]
fn executor_demo_refuses_zero_duts() {
    let out = Command::new(env!("CARGO_BIN_EXE_executor"))
        .args(["demo", "--once", "--duts", "0"])
        .output()
        .expect("executor runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--duts"), "{stderr}");
}

/// The README's first command on a machine where its port is taken: a
/// clear error that names the address and how to pick another port.
#[test]
fn executor_demo_on_a_busy_port_says_how_to_pick_another() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_executor"))
        .args(["demo", "--once", "--duts", "1", "--port", &port])
        .output()
        .expect("executor runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("cannot listen on 127.0.0.1:{port}"))
            && stderr.contains("--port 0"),
        "{stderr}"
    );
}
