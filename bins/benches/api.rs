//! Benchmark of the REST API served by the real `executor` binary with a
//! MarsDB of 200 DUTs and 10 PDUs (dummy driver, 20 ports each).
//!
//! `cargo bench -p vivian --bench api` reports, for 32 concurrent keep-alive
//! connections: requests per second and p50/p99 latency of
//! `GET /api/v1/full-state`, `GET /api/v1/duts` and `GET /api/v1/dut/<id>`;
//! plus the time from start to the first answer, the resident memory (once
//! start-up is over, after the load and idle after it), the idle CPU use
//! and the time until an edit of the MarsDB file is served.
//! For each endpoint it also reports the executor's CPU time per request
//! (user + system, from `/proc`): unlike the wall-clock figures, it holds
//! when other processes compete for the machine's cores.
//! Environment: `BENCH_SECONDS` (per endpoint, default 5), `BENCH_LOG`
//! (the executor's `RUST_LOG`, default `info`; `info,vivian::http=debug`
//! logs every request), `BENCH_EXECUTOR` (the binary to measure, default
//! the one cargo built with the bench).

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const DUTS: usize = 200;
const PDUS: usize = 10;
const PORTS: usize = 20;
const CONNECTIONS: usize = 32;

fn mac(i: usize) -> String {
    format!("52:54:00:00:{:02x}:{:02x}", i / 256, i % 256)
}

fn mars_db(comment: &str) -> String {
    let mut s = String::from("pdus:\n");
    for p in 0..PDUS {
        s.push_str(&format!(
            "  PDU{p}:\n    driver: dummy\n    config:\n      ports: ["
        ));
        for port in 0..PORTS {
            if port > 0 {
                s.push_str(", ");
            }
            s.push_str(&format!("\"outlet-{port}\""));
        }
        s.push_str("]\n    reserved_port_ids: []\n");
    }
    s.push_str("duts:\n");
    for i in 0..DUTS {
        let m = mac(i);
        s.push_str(&format!(
            "  \"{m}\":\n    base_name: gfx{}\n    ip_address: 10.42.{}.{}\n    tags: [\"amdgpu:gfxversion:gfx{}\", \"amdgpu:family:NV\", \"vk:VRAM:8_GiB\"]\n    manual_tags: [\"bench\"]\n    mac_address: \"{m}\"\n    local_tty_device: ttyUSB{}\n    pdu: PDU{}\n    pdu_port_id: \"{}\"\n    pdu_off_delay: 5\n    ready_for_service: true\n    is_retired: false\n    comment: \"{}\"\n    first_seen: 2024-01-01T00:00:{:02}Z\n",
            i % 12, i / 250, i % 250 + 1, i % 12, i % 8, i / PORTS, i % PORTS,
            if i == 7 { comment } else { "" },
            i % 60
        ));
    }
    s
}

struct Server {
    child: Child,
}

impl Drop for Server {
    /// SIGTERM first, as an operator stops the executor (it shuts down
    /// gracefully, and an instrumented build of `scripts/pgo-build` writes
    /// its profile on the way out); SIGKILL after 10 s.
    fn drop(&mut self) {
        // SAFETY: kill sends a signal to our own child, which has not been
        // reaped yet (so the pid is still its).
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        for _ in 0..200 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("the executor did not stop within 10 s of SIGTERM: killing it");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One HTTP/1.1 GET on a keep-alive connection; returns the status and
/// the body length.
async fn get(
    conn: &mut TcpStream,
    buf: &mut Vec<u8>,
    request: &[u8],
) -> std::io::Result<(u16, usize)> {
    conn.write_all(request).await?;
    buf.clear();
    let mut tmp = [0u8; 65536];
    let header_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let n = conn.read(&mut tmp).await?;
        if n == 0 {
            return Err(std::io::Error::other("connection closed"));
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = std::str::from_utf8(&buf[..header_end]).map_err(std::io::Error::other)?;
    let status: u16 = head[9..12].parse().map_err(std::io::Error::other)?;
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .ok_or_else(|| std::io::Error::other("no content-length"))?;
    let mut have = buf.len() - header_end;
    while have < len {
        let n = conn.read(&mut tmp).await?;
        if n == 0 {
            return Err(std::io::Error::other("connection closed in the body"));
        }
        have += n;
    }
    Ok((status, len))
}

struct Result {
    requests: usize,
    seconds: f64,
    p50_us: u64,
    p99_us: u64,
    body: usize,
}

async fn load(port: u16, paths: Vec<String>, seconds: f64) -> Result {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..CONNECTIONS {
        let paths = paths.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            conn.set_nodelay(true).unwrap();
            let mut buf = Vec::with_capacity(1 << 20);
            let mut lat = Vec::with_capacity(100_000);
            let mut body = 0;
            let mut i = c;
            while Instant::now() < deadline {
                let path = &paths[i % paths.len()];
                i += 1;
                let req = format!("GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n");
                let t = Instant::now();
                let (status, len) = get(&mut conn, &mut buf, req.as_bytes()).await.unwrap();
                lat.push(t.elapsed().as_micros() as u64);
                assert_eq!(status, 200, "GET {path}");
                body = len;
            }
            (lat, body)
        }));
    }
    let mut all = Vec::new();
    let mut body = 0;
    for t in tasks {
        let (lat, b) = t.await.unwrap();
        all.extend(lat);
        body = b;
    }
    let seconds = start.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
    Result {
        requests: all.len(),
        seconds,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        body,
    }
}

/// A `/proc/<pid>/status` field in KiB (`VmRSS`, `RssAnon`, `RssFile`).
fn status_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// RSS with its split: anonymous memory (heap, stacks, relocated data) and
/// file-backed pages (the executable's code and read-only data as the
/// kernel mapped them, shared with the page cache).
fn rss(pid: u32) -> String {
    let mib = |f| status_kib(pid, f) as f64 / 1024.0;
    format!(
        "{:.1} MiB (anonymous {:.1} MiB, file-backed {:.1} MiB)",
        mib("VmRSS"),
        mib("RssAnon"),
        mib("RssFile")
    )
}

fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 (1-based), i.e. 11 and 12 after ')'.
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

async fn wait_first_answer(port: u16, started: Instant) -> Duration {
    loop {
        if let Ok(mut c) = TcpStream::connect(("127.0.0.1", port)).await {
            let mut buf = Vec::new();
            if let Ok((200, _)) = get(
                &mut c,
                &mut buf,
                b"GET /api/v1/duts HTTP/1.1\r\nHost: b\r\n\r\n",
            )
            .await
            {
                return started.elapsed();
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no answer in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn fetch(port: u16, path: &str) -> String {
    let mut c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    c.write_all(format!("GET {path} HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    c.read_to_end(&mut out).await.unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

fn write_by_rename(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn main() {
    // `cargo bench` passes `--bench`; ignore arguments.
    let seconds: f64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5.0);
    let log = std::env::var("BENCH_LOG").unwrap_or_else(|_| "info".into());
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("mars_db.yaml");
    std::fs::write(&db, mars_db("initial")).unwrap();
    let port = free_port();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    // `BENCH_EXECUTOR=<path>` measures another build or copy of the binary
    // (an installed one, say) with the same load.
    let exe = std::env::var_os("BENCH_EXECUTOR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_executor").into());
    let child = Command::new(&exe)
        .env_clear()
        .env("FARM_NAME", "bench")
        .env("MARS_DB_FILE", &db)
        .env("EXECUTOR_HOST", "127.0.0.1")
        .env("EXECUTOR_PORT", port.to_string())
        .env("SERGENT_HARTMAN_QUICK_CHECK", "disabled")
        .env("BOOTS_DISABLE_SERVERS", "1")
        // No SALAD, and gitlab-runner's config.toml in the temporary folder.
        .env("SALAD_URL", "http://127.0.0.1:1")
        .env("GITLAB_CONF_FILE", dir.path().join("gitlab-runner.toml"))
        .env("RUST_LOG", &log)
        // Allocator experiments: `GLIBC_TUNABLES=glibc.malloc.... cargo bench`
        // (the executor then leaves malloc to these settings).
        .env(
            "GLIBC_TUNABLES",
            std::env::var("GLIBC_TUNABLES").unwrap_or_default(),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the executor");
    let server = Server { child };
    let pid = server.child.id();
    let first = rt.block_on(wait_first_answer(port, started));
    println!("executor pid {pid}, RUST_LOG={log}, {DUTS} DUTs, {PDUS} PDUs x {PORTS} ports, {CONNECTIONS} connections, {seconds} s per endpoint");
    println!(
        "first answer after start: {:.1} ms",
        first.as_secs_f64() * 1000.0
    );
    // Let the PDUs list their ports and start-up end: the executor unmaps
    // the code only start-up used (vivian::memory) before the load starts,
    // as in a farm, where requests come later.
    let settled = vivian::memory::START_UP_RELEASE_DELAY + Duration::from_millis(500);
    std::thread::sleep(settled.saturating_sub(started.elapsed()));
    println!("RSS before the load: {}", rss(pid));

    let ids: Vec<String> = (0..DUTS)
        .map(|i| format!("/api/v1/dut/{}", mac(i)))
        .collect();
    let cases: Vec<(&str, Vec<String>)> = vec![
        ("GET /api/v1/full-state", vec!["/api/v1/full-state".into()]),
        ("GET /api/v1/duts", vec!["/api/v1/duts".into()]),
        ("GET /api/v1/dut/<id>", ids),
    ];
    for (name, paths) in cases {
        let cpu0 = cpu_ticks(pid);
        let r = rt.block_on(load(port, paths, seconds));
        let cpu = (cpu_ticks(pid) - cpu0) as f64 / 100.0; // USER_HZ
        println!(
            "{name:<24} {:>9.0} req/s   p50 {:>6.2} ms   p99 {:>6.2} ms   server CPU {:>5.1} us/req ({:.2} cores)   ({} requests, body {} bytes)",
            r.requests as f64 / r.seconds,
            r.p50_us as f64 / 1000.0,
            r.p99_us as f64 / 1000.0,
            cpu * 1e6 / r.requests as f64,
            cpu / r.seconds,
            r.requests,
            r.body
        );
    }
    println!("RSS after the load: {}", rss(pid));

    // Idle CPU over 5 s.
    let tick = 100.0; // USER_HZ on Linux
    let t0 = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(5));
    let t1 = cpu_ticks(pid);
    println!(
        "idle CPU: {:.2} % of a core",
        (t1 - t0) as f64 / tick / 5.0 * 100.0
    );
    println!("RSS idle: {}", rss(pid));

    // Edit visibility: a comment changed in the file (saved by rename).
    let mut times = Vec::new();
    for n in 0..5 {
        let marker = format!("edit-{n}");
        let t = Instant::now();
        write_by_rename(&db, &mars_db(&marker));
        rt.block_on(async {
            loop {
                if fetch(port, &format!("/api/v1/dut/{}", mac(7)))
                    .await
                    .contains(&marker)
                {
                    break;
                }
                assert!(
                    t.elapsed() < Duration::from_secs(10),
                    "edit not served in 10 s"
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        std::thread::sleep(Duration::from_millis(200));
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "MarsDB edit visible after: median {:.1} ms (min {:.1}, max {:.1})",
        times[2], times[0], times[4]
    );
    drop(server);
}
