//! Benchmark of the multiplexer: N simulated consoles (netconsole TCP
//! connections) each sending at a serial line's rate (115200 baud = 11520
//! bytes/s) in chunks every `--chunk-ms`, each with a read-write client
//! attached, console logs written to disk.
//!
//! Reports the CPU used by the multiplexer process (a child process running
//! the library exactly as the `salad` binary does, measured from
//! `/proc/<pid>/stat`) as a percentage of one core, and the latency from a
//! chunk entering a console to its client receiving it (p50, p99, max).
//!
//! Usage: `cargo run --release -p vivian-salad --bin salad-bench -- [--consoles 500]
//! [--seconds 10] [--chunk-ms 10] [--baud 115200]`

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use vivian_salad::{serve_http, Salad, SaladConfig};

struct Args {
    consoles: usize,
    seconds: u64,
    chunk_ms: u64,
    baud: u64,
}

fn parse_args() -> Result<(Args, bool), String> {
    let mut a = Args {
        consoles: 500,
        seconds: 10,
        chunk_ms: 10,
        baud: 115_200,
    };
    let mut serve = false;
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        if k == "--serve" {
            serve = true;
            continue;
        }
        let v = it.next().ok_or(format!("{k} needs a value"))?;
        let n: u64 = v.parse().map_err(|_| format!("{k} {v}: not a number"))?;
        match k.as_str() {
            "--consoles" => a.consoles = n as usize,
            "--seconds" => a.seconds = n,
            "--chunk-ms" => a.chunk_ms = n.max(1),
            "--baud" => a.baud = n,
            _ => return Err(format!("unknown option {k}")),
        }
    }
    Ok((a, serve))
}

fn main() {
    let (args, serve) = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("salad-bench: {e}");
            std::process::exit(2);
        }
    };
    if serve {
        serve_main();
    } else {
        bench_main(args);
    }
}

/// The multiplexer under test, in its own process.
fn serve_main() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let logs = std::env::temp_dir().join(format!("salad-bench-{}", std::process::id()));
        let salad = Salad::start(SaladConfig::local(Some(logs.clone())))
            .await
            .unwrap();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!(
            "READY {} {}",
            salad.netconsole_addr().unwrap(),
            l.local_addr().unwrap()
        );
        tokio::spawn(serve_http(salad.clone(), l));
        // Exit when the parent closes our stdin.
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 16];
        while stdin.read(&mut buf).await.map(|n| n > 0).unwrap_or(false) {}
        salad.shutdown().await;
        let _ = std::fs::remove_dir_all(&logs);
    });
}

fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name in parentheses; utime and stime are
    // fields 14 and 15 (1-based).
    let rest = &s[s.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// USER_HZ, fixed at 100 by the Linux ABI on the architectures we run on.
const TICKS_PER_SEC: f64 = 100.0;

fn bench_main(args: Args) {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .arg("--serve")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let parts: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(parts.first(), Some(&"READY"), "child said {line:?}");
    let netconsole: std::net::SocketAddr = parts[1].parse().unwrap();
    let http = format!("http://{}", parts[2]);
    let pid = child.id();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let result = rt.block_on(run(&args, netconsole, &http, pid));
    drop(child.stdin.take());
    let _ = child.wait();
    println!("{result}");
}

async fn run(args: &Args, netconsole: std::net::SocketAddr, http: &str, pid: u32) -> String {
    let n = args.consoles;
    let chunk = (args.baud / 10 * args.chunk_ms / 1000).max(24) as usize;
    let epoch = Instant::now();
    let http_client = reqwest::Client::new();
    let mut consoles = Vec::with_capacity(n);
    let latencies = Arc::new(Mutex::new(Vec::<u32>::new()));
    let recording = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    for i in 0..n {
        let mut c = TcpStream::connect(netconsole).await.unwrap();
        c.set_nodelay(true).unwrap();
        c.write_all(format!("SALAD.machine_id=bench-{i}\n").as_bytes())
            .await
            .unwrap();
        let m: serde_json::Value = http_client
            .get(format!("{http}/api/v1/machine/bench-{i}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let port = m["tcp_port"].as_u64().unwrap() as u16;
        let mut client = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        client.set_nodelay(true).unwrap();
        let lat = latencies.clone();
        let rec = recording.clone();
        let recv = received.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 16384];
            let mut partial: Vec<u8> = Vec::new();
            loop {
                let k = match client.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(k) => k,
                };
                let now = epoch.elapsed().as_micros() as u64;
                recv.fetch_add(k as u64, Ordering::Relaxed);
                partial.extend_from_slice(&buf[..k]);
                let mut local = Vec::new();
                while let Some(p) = partial.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = partial.drain(..=p).collect();
                    if line.len() > 17 && line[0] == b'T' {
                        if let Ok(s) = std::str::from_utf8(&line[1..17]) {
                            if let Ok(sent) = u64::from_str_radix(s, 16) {
                                local.push(now.saturating_sub(sent) as u32);
                            }
                        }
                    }
                }
                if rec.load(Ordering::Relaxed) && !local.is_empty() {
                    lat.lock().unwrap().extend(local);
                }
            }
        });
        consoles.push(c);
    }
    // Wait until every client is registered.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // One writer: every millisecond, the consoles whose turn it is send a
    // chunk (console i sends at ticks ≡ i mod chunk_ms), so the load is
    // spread evenly like independent serial lines.
    let ticks_per_period = args.chunk_ms;
    let warmup = Duration::from_secs(2);
    let total = warmup + Duration::from_secs(args.seconds);
    let start = Instant::now();
    let mut interval = tokio::time::interval(Duration::from_millis(1));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tick: u64 = 0;
    let mut sent_bytes: u64 = 0;
    let mut measuring = false;
    let (mut cpu0, mut t0) = (0u64, Instant::now());
    let mut line = vec![b'.'; chunk];
    *line.last_mut().unwrap() = b'\n';
    while start.elapsed() < total {
        if !measuring && start.elapsed() >= warmup {
            measuring = true;
            recording.store(true, Ordering::Relaxed);
            cpu0 = cpu_ticks(pid);
            t0 = Instant::now();
            sent_bytes = 0;
            received.store(0, Ordering::Relaxed);
        }
        interval.tick().await;
        let slot = tick % ticks_per_period;
        let mut i = slot as usize;
        while i < n {
            let ts = epoch.elapsed().as_micros() as u64;
            line[0] = b'T';
            line[1..17].copy_from_slice(format!("{ts:016x}").as_bytes());
            let c = &mut consoles[i];
            c.write_all(&line).await.unwrap();
            sent_bytes += line.len() as u64;
            i += ticks_per_period as usize;
        }
        tick += 1;
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = (cpu_ticks(pid) - cpu0) as f64 / TICKS_PER_SEC;
    recording.store(false, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let recv = received.load(Ordering::Relaxed);
    let mut lat = latencies.lock().unwrap().clone();
    lat.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return f64::NAN;
        }
        lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)] as f64 / 1000.0
    };
    format!(
        "salad-bench: {n} consoles at {} baud ({} B/s each, {chunk}-byte chunks every {} ms), {:.1} s measured\n\
         offered {:.2} MB/s, delivered {:.2} MB/s to {n} read-write clients\n\
         salad CPU: {:.1}% of one core ({:.2} s CPU over {:.1} s)\n\
         byte->client latency over {} chunks: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        args.baud,
        args.baud / 10,
        args.chunk_ms,
        wall,
        sent_bytes as f64 / wall / 1e6,
        recv as f64 / wall / 1e6,
        100.0 * cpu / wall,
        cpu,
        wall,
        lat.len(),
        pct(0.5),
        pct(0.99),
        lat.last().copied().unwrap_or(0) as f64 / 1000.0,
    )
}
