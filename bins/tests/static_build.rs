//! The statically linked executor of `scripts/static-build`, the build for
//! a machine with another glibc: it needs no shared library, serves its API, and
//! still resolves host names (`localhost` from /etc/hosts) through the C
//! library linked into it.
//!
//! `scripts/test-all` builds it and names it in `VIVIAN_STATIC_EXECUTOR`;
//! a plain `cargo test` without that variable skips this test.

mod process_support;

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use process_support::{free_port, wait_for, Proc};

/// `readelf <flag> exe`, as text.
fn readelf(flag: &str, exe: &str) -> String {
    let out = Command::new("readelf")
        .args([flag, exe])
        .output()
        .expect("readelf (binutils) runs");
    assert!(out.status.success(), "readelf {flag} {exe} failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn the_static_executor_needs_no_shared_library_and_resolves_host_names() {
    let Ok(exe) = std::env::var("VIVIAN_STATIC_EXECUTOR") else {
        eprintln!("skipped: VIVIAN_STATIC_EXECUTOR is not set (scripts/test-all sets it)");
        return;
    };
    let headers = readelf("-lW", &exe);
    assert!(
        !headers.contains("INTERP"),
        "{exe} asks for a program interpreter (dynamic loader):\n{headers}"
    );
    let dynamic = readelf("-dW", &exe);
    assert!(
        !dynamic.contains("(NEEDED)"),
        "{exe} needs shared libraries:\n{dynamic}"
    );

    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("mars_db.yaml");
    std::fs::write(
        &db,
        "pdus: {}\nduts:\n  \"52:54:00:11:22:33\":\n    base_name: static\n    mac_address: \"52:54:00:11:22:33\"\n    ip_address: 10.0.0.2\n    tags: []\n",
    )
    .unwrap();
    // The console service: the executor looks its machines up at start-up,
    // at a URL naming `localhost`.
    let salad = TcpListener::bind("127.0.0.1:0").unwrap();
    salad.set_nonblocking(true).unwrap();
    let salad_port = salad.local_addr().unwrap().port();
    let port = free_port();
    let log = dir.path().join("executor.log");
    let child = Command::new(&exe)
        .env_clear()
        .env("FARM_NAME", "static")
        .env("MARS_DB_FILE", &db)
        .env("EXECUTOR_HOST", "localhost")
        .env("EXECUTOR_PORT", port.to_string())
        .env("BOOTS_DISABLE_SERVERS", "1")
        .env("SERGENT_HARTMAN_QUICK_CHECK", "disabled")
        .env("SALAD_URL", format!("http://localhost:{salad_port}"))
        .env("GITLAB_CONF_FILE", dir.path().join("gitlab-runner.toml"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start the static executor");
    let mut server = Proc(child);
    let url = format!("http://127.0.0.1:{port}/api/v1/duts");
    let answered = tokio::time::timeout(
        Duration::from_secs(20),
        wait_for(&url, "the static executor's API", |v| {
            v["duts"]["52:54:00:11:22:33"]["base_name"] == "static"
        }),
    )
    .await;
    if answered.is_err() || server.0.try_wait().unwrap().is_some() {
        drop(server);
        let out = std::fs::read_to_string(&log).unwrap_or_default();
        panic!("the static executor did not serve its MarsDB on localhost:{port}:\n{out}");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let connected = loop {
        match salad.accept() {
            Ok(_) => break true,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(_) => break false,
        }
    };
    drop(server);
    let out = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        connected,
        "the static executor never connected to SALAD_URL=http://localhost:{salad_port}:\n{out}"
    );
}
