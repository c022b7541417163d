//! An executor on a machine without CA certificates (no `ca-certificates`
//! package, or an empty trust store) starts and serves its API: SALAD and
//! the artifact downloads over plain http need no TLS roots. It used to
//! panic at start-up building an HTTP client. `executorctl` on such a
//! machine talks to the executor over http just as well.

mod process_support;

use std::process::{Command, Stdio};

use process_support::{free_port, wait_for, Proc};

#[tokio::test]
async fn the_executor_starts_without_any_ca_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("no-certs");
    std::fs::create_dir(&empty).unwrap();
    let db = dir.path().join("mars_db.yaml");
    std::fs::write(&db, "pdus: {}\nduts: {}\n").unwrap();
    let port = free_port();
    let log = dir.path().join("executor.log");
    let child = Command::new(env!("CARGO_BIN_EXE_executor"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("FARM_NAME", "nocerts")
        .env("MARS_DB_FILE", &db)
        .env("EXECUTOR_HOST", "127.0.0.1")
        .env("EXECUTOR_PORT", port.to_string())
        .env("BOOTS_DISABLE_SERVERS", "1")
        .env("SALAD_URL", "http://127.0.0.1:1")
        .env("GITLAB_CONF_FILE", dir.path().join("gitlab-runner.toml"))
        // The artifact cache builds an HTTP client of its own.
        .env("EXECUTOR_ARTIFACT_CACHE_ROOT", dir.path().join("cache"))
        // What rustls' platform verifier reads on Linux: nothing there.
        .env("SSL_CERT_FILE", empty.join("none.pem"))
        .env("SSL_CERT_DIR", &empty)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start the executor");
    let mut exe = Proc(child);
    let url = format!("http://127.0.0.1:{port}/api/v1/duts");
    let answered = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        wait_for(&url, "the executor's API", |v| v["duts"].is_object()),
    )
    .await;
    if answered.is_err() || exe.0.try_wait().unwrap().is_some() {
        drop(exe);
        let out = std::fs::read_to_string(&log).unwrap_or_default();
        panic!("the executor did not serve its API without CA certificates:\n{out}");
    }
    // executorctl on that machine: the executor's URL is plain http.
    let ctl = Command::new(env!("CARGO_BIN_EXE_executorctl"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("SSL_CERT_FILE", empty.join("none.pem"))
        .env("SSL_CERT_DIR", &empty)
        .args(["-e", &format!("http://127.0.0.1:{port}"), "duts"])
        .output()
        .expect("run executorctl");
    let stdout = String::from_utf8_lossy(&ctl.stdout);
    let stderr = String::from_utf8_lossy(&ctl.stderr);
    assert!(
        ctl.status.success() && stdout.contains("(no DUTs)"),
        "executorctl duts without CA certificates: {}\n{stdout}\n{stderr}",
        ctl.status
    );
    drop(exe);
    let out = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        out.contains("the artifact cache client works over http only"),
        "the artifact cache was opened without CA certificates and says so:\n{out}"
    );
}
