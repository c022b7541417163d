//! Benchmark of the job path on the in-process virtual farm
//! ([`vivian::demo::DemoFarm`]): the real REST API, job engine, console
//! multiplexer and virtual PDU (over TCP), with simulated DUTs that netboot
//! from the executor.
//!
//! `cargo bench -p vivian --bench jobs` reports:
//!
//! 1. **submission to power-on**: the time from sending `POST /api/v1/jobs`
//!    (a new connection, as executorctl makes) to the virtual PDU receiving
//!    the outlet's ON command, for a DUT whose minimum off time has already
//!    elapsed (target: p99 under 50 ms). In between, the executor parses
//!    the job, picks the DUT, connects back to the client, opens the job
//!    log, attaches the console and switches the port OFF then ON;
//! 2. **console latency**: the time from a simulated DUT writing a console
//!    line (it stamps the wall-clock time into the line, `@TIME_NS@`) to the
//!    client decoding it from its `job_io` frame, through the netconsole,
//!    the console multiplexer, the job engine and the callback connection
//!    (target: p99 under 10 ms); with one DUT printing, then four at once.
//!
//! Environment: `BENCH_JOBS` (submissions, default 100), `BENCH_LINES`
//! (console lines per DUT, default 500), `BENCH_LINE_INTERVAL_MS` (default
//! 5); `RUST_LOG` (e.g. `debug,hyper=info,reqwest=info`) prints the farm's
//! events with time stamps, to see where the time goes (the engine logs
//! each setup step: connected back, job parsed, console attached; the PDU
//! layer and the virtual PDU log each command).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use reqwest::multipart::{Form, Part};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use vivian::demo::{DemoFarm, DemoOptions, PowerHook};
use vivian_core::protocol::{self, Payload};
use vivian_core::state::DutState;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos()
}

/// Percentile `p` (0-100) of sorted `v`, nearest rank.
fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// The machine's load (`/proc/loadavg`: 1, 5 and 15 minutes), printed
/// with the figures: the machine may be shared.
fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into())
}

fn report(name: &str, mut ms: Vec<f64>, target_p99: f64) {
    ms.sort_by(|a, b| a.total_cmp(b));
    let p99 = percentile(&ms, 99.0);
    println!(
        "{name}: n={} min={:.2} ms p50={:.2} ms p90={:.2} ms p99={:.2} ms max={:.2} ms (target p99 < {target_p99} ms: {})",
        ms.len(),
        ms.first().copied().unwrap_or(f64::NAN),
        percentile(&ms, 50.0),
        percentile(&ms, 90.0),
        p99,
        ms.last().copied().unwrap_or(f64::NAN),
        if p99 < target_p99 { "met" } else { "NOT met" }
    );
}

/// A job for outlet `outlet`'s DUT whose kernel is `kernel` (an artifact
/// of the demo farm).
fn job_text(farm: &DemoFarm, kernel: &str) -> String {
    format!(
        r#"version: 1
target: {{tags: [sim]}}
timeouts:
  overall: {{minutes: 5}}
console_patterns:
  session_end: {{regex: "reboot: Power down"}}
  job_success: {{regex: "^BENCH_DONE"}}
deployment:
  start:
    kernel:
      url: "{a}/{kernel}"
      cmdline: ["SALAD.machine_id={{{{ machine_id }}}}"]
    initramfs:
      url: "{a}/initrd"
"#,
        a = farm.artifacts_url()
    )
}

/// What the client saw of one job.
struct Session {
    /// Console lines with the time they were decoded (ns since the epoch).
    lines: Vec<(String, u128)>,
    status: Option<String>,
}

/// Submits `job` for DUT `dut` (a fresh HTTP connection, as executorctl)
/// and returns when the submission was sent plus the session's result.
async fn submit(
    api: &str,
    dut: &str,
    job: &str,
    job_id: &str,
) -> (Instant, tokio::task::JoinHandle<Session>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let meta = serde_json::json!({
        "version": 1,
        "job_id": job_id,
        "callback": {"host": "127.0.0.1", "port": port},
        "target": {"id": dut},
    });
    let form = Form::new()
        .part(
            "metadata",
            Part::bytes(meta.to_string().into_bytes())
                .file_name("metadata")
                .mime_str("application/json")
                .unwrap(),
        )
        .part(
            "job",
            Part::bytes(job.as_bytes().to_vec())
                .file_name("job")
                .mime_str("application/x-yaml")
                .unwrap(),
        );
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let session = tokio::spawn(async move {
        let (stream, _) = tokio::time::timeout(Duration::from_secs(30), listener.accept())
            .await
            .expect("the executor connects back")
            .unwrap();
        let _ = stream.set_nodelay(true);
        let (mut rd, _wr) = stream.into_split();
        let mut s = Session {
            lines: Vec::new(),
            status: None,
        };
        let mut partial = Vec::new();
        while let Ok(Some(m)) = protocol::read_message(&mut rd).await {
            match m.payload {
                Payload::JobIo(data) => {
                    let at = now_ns();
                    partial.extend_from_slice(&data);
                    while let Some(i) = partial.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = partial.drain(..=i).collect();
                        s.lines
                            .push((String::from_utf8_lossy(&line).trim().to_string(), at));
                    }
                }
                Payload::SessionEnd(e) => {
                    s.status = Some(e.status.to_string());
                    break;
                }
                Payload::Control(_) => {}
            }
        }
        s
    });
    let t0 = Instant::now();
    let resp = client
        .post(format!("{api}/api/v1/jobs"))
        .multipart(form)
        .send()
        .await
        .expect("POST /api/v1/jobs");
    assert!(
        resp.status().is_success(),
        "the job was refused: {} {}",
        resp.status(),
        resp.text().await.unwrap_or_default()
    );
    (t0, session)
}

async fn wait_idle(farm: &DemoFarm, dut: &str) {
    let id = dut.parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while farm.farm.dut_state(&id) != Some(DutState::Idle) {
        assert!(Instant::now() < deadline, "{dut} never went back to IDLE");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Console latencies (ms) of the `LAT <ns>` lines of a session.
fn latencies(s: &Session) -> Vec<f64> {
    s.lines
        .iter()
        .filter_map(|(l, at)| {
            let stamp: u128 = l.strip_prefix("LAT ")?.trim().parse().ok()?;
            Some(at.saturating_sub(stamp) as f64 / 1e6)
        })
        .collect()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let jobs = env_usize("BENCH_JOBS", 100);
    let lines = env_usize("BENCH_LINES", 500);
    let interval_ms = env_usize("BENCH_LINE_INTERVAL_MS", 5);
    // RUST_LOG=debug (for example) shows where the time goes, each event
    // with its time stamp (µs) and span.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_timer(tracing_subscriber::fmt::time::uptime())
            .with_writer(std::io::stderr)
            .init();
    }

    let (on_tx, mut on_rx) = mpsc::unbounded_channel::<(u16, Instant)>();
    let on_tx = Arc::new(Mutex::new(on_tx));
    let hook = PowerHook(Arc::new(move |outlet, on| {
        if on {
            let _ = on_tx.lock().unwrap().send((outlet, Instant::now()));
        }
    }));
    let farm = DemoFarm::start(DemoOptions {
        duts: 4,
        power_hook: Some(hook),
        job_env: BTreeMap::new(),
        ..DemoOptions::default()
    })
    .await
    .expect("the virtual farm starts");
    let artifacts = farm.dir.join("artifacts");
    std::fs::write(
        artifacts.join("quick"),
        "#!vivian-sim\nprint BENCH_DONE\npoweroff\n",
    )
    .unwrap();
    let mut script = String::from("#!vivian-sim\n");
    let sleep = format!("sleep {}\n", interval_ms as f64 / 1000.0);
    for _ in 0..lines {
        script.push_str("print LAT @TIME_NS@\n");
        script.push_str(&sleep);
    }
    script.push_str("print BENCH_DONE\npoweroff\n");
    std::fs::write(artifacts.join("latency"), script).unwrap();
    let dut0 = vivian::vpdu::outlet_mac(0);
    println!(
        "jobs bench: in-process farm, 4 simulated DUTs, REST API on {}; {} CPUs, load average {}",
        farm.api_url,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load()
    );

    // 1. Submission to power-on, one job at a time on DUT 0.
    let quick = job_text(&farm, "quick");
    let mut post_to_on = Vec::with_capacity(jobs);
    for i in 0..jobs {
        // The minimum off time (0.1 s) has elapsed since the last job.
        tokio::time::sleep(Duration::from_millis(150)).await;
        while on_rx.try_recv().is_ok() {}
        let (t0, session) = submit(&farm.api_url, &dut0, &quick, &format!("bench-{i}")).await;
        let (outlet, t_on) = tokio::time::timeout(Duration::from_secs(10), on_rx.recv())
            .await
            .expect("the outlet is switched ON")
            .unwrap();
        assert_eq!(outlet, 0);
        post_to_on.push(t_on.duration_since(t0).as_secs_f64() * 1000.0);
        let s = tokio::time::timeout(Duration::from_secs(60), session)
            .await
            .expect("the job ends")
            .unwrap();
        assert_eq!(s.status.as_deref(), Some("PASS"), "job {i}");
        wait_idle(&farm, &dut0).await;
    }
    report("POST /api/v1/jobs -> PDU ON", post_to_on, 50.0);

    // 2. Console latency, one DUT printing.
    let lat_job = job_text(&farm, "latency");
    let (_, session) = submit(&farm.api_url, &dut0, &lat_job, "bench-latency-1").await;
    let s = tokio::time::timeout(Duration::from_secs(300), session)
        .await
        .expect("the job ends")
        .unwrap();
    assert_eq!(s.status.as_deref(), Some("PASS"));
    let lat = latencies(&s);
    assert_eq!(lat.len(), lines, "every stamped line arrived");
    report("console latency DUT -> client (1 DUT)", lat, 10.0);
    wait_idle(&farm, &dut0).await;
    tokio::time::sleep(Duration::from_millis(150)).await;

    // 3. Console latency, four DUTs printing at once.
    let mut sessions = Vec::new();
    for o in 0..4u16 {
        let dut = vivian::vpdu::outlet_mac(o);
        let (_, s) = submit(
            &farm.api_url,
            &dut,
            &lat_job,
            &format!("bench-latency-4-{o}"),
        )
        .await;
        sessions.push(s);
    }
    let mut all = Vec::new();
    for s in sessions {
        let s = tokio::time::timeout(Duration::from_secs(300), s)
            .await
            .expect("the job ends")
            .unwrap();
        assert_eq!(s.status.as_deref(), Some("PASS"));
        let lat = latencies(&s);
        assert_eq!(lat.len(), lines, "every stamped line arrived");
        all.extend(lat);
    }
    report("console latency DUT -> client (4 DUTs at once)", all, 10.0);
    println!("load average at the end: {}", load());
    farm.stop().await;
}
