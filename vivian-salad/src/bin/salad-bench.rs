//! Benchmark of the multiplexer: N simulated consoles each sending at a
//! serial line's rate (115200 baud = 11520 bytes/s) in chunks every
//! `--chunk-ms`, each with a read-write client attached, console logs
//! written to disk.
//!
//! The consoles are netconsole TCP connections by default; `--serial` makes
//! them serial ports instead, simulated by pseudo-terminal pairs: the load
//! generator writes to the master side, the multiplexer finds the slave
//! sides through its serial globs (symbolic links in a temporary directory)
//! and opens them as it opens `/dev/ttyUSB*`. The two modes differ in what
//! the multiplexer's process pays for a console byte: for a netconsole the
//! kernel's TCP receive path of the console connection runs in the
//! generator's `send` but the multiplexer's `recv` and ACK are its own; for
//! a pty, the line discipline runs in a kernel worker, as a USB serial
//! adapter's does in interrupt context, and the multiplexer's `read` only
//! copies.
//!
//! The multiplexer runs in a child process (the library exactly as the
//! `salad` binary runs it), so its resource use can be read from `/proc`
//! apart from the load generator's:
//!
//! - **CPU**: user + system time of the process (`/proc/<pid>/stat`), as a
//!   percentage of one core and per console chunk. CPU time is what the
//!   process consumed, whatever else runs on the machine, so this figure
//!   holds on a loaded machine (within cache and frequency effects);
//! - **syscalls** (`/proc/<pid>/io`: read/write calls) and **context
//!   switches** (voluntary: the runtime went idle and woke up again), per
//!   chunk: the cost model of the data path;
//! - **run-queue wait** (`/proc/<pid>/task/*/schedstat`): how long the
//!   multiplexer's threads were runnable but waiting for a CPU. On a loaded
//!   machine this is what inflates the latency figures; it is reported next
//!   to them, with the machine's load average and the share of the CPUs
//!   others used, so a latency figure can be judged;
//! - **latency** from a chunk entering a console (the load generator's write)
//!   to its client receiving it: p50, p99, p99.9, max (wall clock: it
//!   includes the scheduling delays of both processes).
//!
//! `--realtime` runs both processes under `SCHED_FIFO` (root only), the
//! multiplexer above the load generator: their wake-ups then preempt
//! ordinary processes (compilers...), which makes the latency figure
//! meaningful on a shared machine. Without it, a loaded machine starves the
//! load generator and the bench warns that the offered rate fell short.
//! CPU time is measured the same way in both modes.
//!
//! The multiplexer runs on the runtime of the `salad` binary
//! ([`vivian_salad::runtime::build`]: one thread, wake-ups batched by
//! `--batch-ms`, default 2 as `SALAD_BATCH_MS`; `--threads` as
//! `SALAD_THREADS`); `--multi-thread` runs it on tokio's default
//! multi-thread runtime instead (no batching), for comparison.
//!
//! `--floor` replaces the multiplexer with the least a forwarder can do: one
//! thread, level-triggered `epoll`, one `read` from the console (netconsole
//! or, with `--serial`, pty) and one `send` to its client per ready
//! console, no line splitting, no log, no runtime, the same wake-up
//! batching. Its CPU per chunk is the kernel's
//! price of the data path on this machine, the floor for the multiplexer's
//! figure; it speaks just enough of the protocol (the `SALAD.machine_id`
//! line, `GET /api/v1/machine/<id>`) for the same load generator.
//!
//! Usage: `cargo run --release -p vivian-salad --bin salad-bench -- [--consoles 500]
//! [--seconds 10] [--chunk-ms 10] [--baud 115200] [--realtime] [--batch-ms 2] [--threads 1] [--multi-thread] [--floor]`

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    realtime: bool,
    batch_ms: u64,
    threads: usize,
    multi_thread: bool,
    floor: bool,
    /// Pseudo-terminal consoles instead of netconsoles; in the multiplexer's
    /// process: the directory of their links.
    serial: bool,
    serial_dir: Option<String>,
}

const USAGE: &str = "usage: salad-bench [--consoles N] [--seconds S] [--chunk-ms MS] [--baud B] [--realtime] [--batch-ms MS] [--threads N] [--multi-thread] [--floor] [--serial]";

fn parse_args() -> Result<(Args, bool), String> {
    let mut a = Args {
        consoles: 500,
        seconds: 10,
        chunk_ms: 10,
        baud: 115_200,
        realtime: false,
        batch_ms: vivian_salad::runtime::DEFAULT_BATCH.as_millis() as u64,
        threads: 1,
        multi_thread: false,
        floor: false,
        serial: false,
        serial_dir: None,
    };
    let mut serve = false;
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        match k.as_str() {
            "--serve" => {
                serve = true;
                continue;
            }
            "--realtime" => {
                a.realtime = true;
                continue;
            }
            "--multi-thread" => {
                a.multi_thread = true;
                continue;
            }
            "--floor" => {
                a.floor = true;
                continue;
            }
            "--serial" => {
                a.serial = true;
                continue;
            }
            "--serial-dir" => {
                a.serial_dir = Some(it.next().ok_or(format!("{k} needs a value\n{USAGE}"))?);
                continue;
            }
            "--help" | "-h" => return Err(USAGE.into()),
            _ => {}
        }
        let v = it.next().ok_or(format!("{k} needs a value\n{USAGE}"))?;
        let n: u64 = v
            .parse()
            .map_err(|_| format!("{k} {v}: not a whole number\n{USAGE}"))?;
        match k.as_str() {
            "--consoles" => a.consoles = (n as usize).max(1),
            "--seconds" => a.seconds = n.max(1),
            "--chunk-ms" => a.chunk_ms = n.max(1),
            "--baud" => a.baud = n.max(10),
            "--batch-ms" => a.batch_ms = n,
            "--threads" => a.threads = n as usize,
            _ => return Err(format!("unknown option {k}\n{USAGE}")),
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
    if args.realtime {
        // The multiplexer above the load generator: when it has work it
        // runs, so the generator's own CPU use does not delay it.
        set_fifo(if serve {
            SALAD_PRIORITY
        } else {
            GENERATOR_PRIORITY
        });
    }
    if serve && args.floor {
        floor::serve(
            Duration::from_millis(args.batch_ms),
            args.serial_dir.as_deref(),
        );
        return;
    }
    if serve {
        serve_main(&args);
        return;
    }
    bench_main(args);
}

/// `SCHED_FIFO` priorities of `--realtime`.
const SALAD_PRIORITY: i32 = 20;
const GENERATOR_PRIORITY: i32 = 10;

/// Switch the calling thread, the threads it creates from now on and its
/// children (across fork and exec) to `SCHED_FIFO` at `priority`.
fn set_fifo(priority: i32) {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: plain system call on the calling thread with a valid
    // parameter block.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } != 0 {
        eprintln!(
            "salad-bench: --realtime: cannot switch to SCHED_FIFO (root or CAP_SYS_NICE needed): {}",
            std::io::Error::last_os_error()
        );
        std::process::exit(2);
    }
}

/// The multiplexer under test, in its own process.
fn serve_main(args: &Args) {
    let rt = if args.multi_thread {
        tokio::runtime::Runtime::new().unwrap()
    } else {
        vivian_salad::runtime::build(Duration::from_millis(args.batch_ms), args.threads)
            .unwrap_or_else(|e| {
                eprintln!("salad-bench: --batch-ms/--threads: {e}");
                std::process::exit(2)
            })
    };
    rt.block_on(async {
        let logs = std::env::temp_dir().join(format!("salad-bench-{}", std::process::id()));
        let mut config = SaladConfig::local(Some(logs.clone()));
        if let Some(dir) = &args.serial_dir {
            config.serial_globs = vec![format!("{dir}/{PTY_LINK_PREFIX}*")];
        }
        let salad = Salad::start(config).await.unwrap();
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

/// Resource counters of a process, from `/proc`.
#[derive(Debug, Default, Clone, Copy)]
struct ProcSample {
    /// utime and stime, in clock ticks (every thread, exited ones
    /// included).
    user_ticks: u64,
    system_ticks: u64,
    /// Time the live threads spent runnable but waiting for a CPU, ns.
    run_delay_ns: u64,
    /// Context switches of the live threads.
    voluntary_cs: u64,
    involuntary_cs: u64,
    /// read-like and write-like system calls (`/proc/<pid>/io`), if the
    /// kernel accounts them.
    syscalls: Option<(u64, u64)>,
}

/// USER_HZ, fixed at 100 by the Linux ABI on the architectures we run on.
const TICKS_PER_SEC: f64 = 100.0;

fn read_proc(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn sample(pid: u32) -> ProcSample {
    let mut s = ProcSample::default();
    let stat = read_proc(&format!("/proc/{pid}/stat"));
    if let Some(close) = stat.rfind(')') {
        // Fields after the command name: state is field 3, utime and stime
        // are fields 14 and 15 (1-based).
        let f: Vec<&str> = stat[close + 2..].split(' ').collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        s.user_ticks = num(11);
        s.system_ticks = num(12);
    }
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let dir = t.path();
            let sched = read_proc(&format!("{}/schedstat", dir.display()));
            if let Some(d) = sched.split_whitespace().nth(1) {
                s.run_delay_ns += d.parse::<u64>().unwrap_or(0);
            }
            for line in read_proc(&format!("{}/status", dir.display())).lines() {
                let val = |l: &str| {
                    l.split_whitespace()
                        .nth(1)
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0)
                };
                if line.starts_with("voluntary_ctxt_switches:") {
                    s.voluntary_cs += val(line);
                } else if line.starts_with("nonvoluntary_ctxt_switches:") {
                    s.involuntary_cs += val(line);
                }
            }
        }
    }
    let io = read_proc(&format!("/proc/{pid}/io"));
    let field = |name: &str| {
        io.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    if let (Some(r), Some(w)) = (field("syscr:"), field("syscw:")) {
        s.syscalls = Some((r, w));
    }
    s
}

/// Busy and total jiffies of all CPUs (`/proc/stat`).
fn machine_cpu() -> (u64, u64) {
    let stat = read_proc("/proc/stat");
    let Some(line) = stat.lines().next() else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    // idle + iowait
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle), total)
}

fn load_average() -> String {
    read_proc("/proc/loadavg")
        .split_whitespace()
        .next()
        .unwrap_or("?")
        .to_string()
}

/// CPU time (user + system) this process used so far, in seconds.
fn own_cpu() -> f64 {
    // SAFETY: getrusage fills the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return f64::NAN;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn bench_main(args: Args) {
    let ptys = args.serial.then(|| pty::Ptys::open(args.consoles));
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .arg("--serve")
        .args(args.realtime.then_some("--realtime"))
        .args(args.multi_thread.then_some("--multi-thread"))
        .args(args.floor.then_some("--floor"))
        .args(
            ptys.as_ref()
                .map(|p| ["--serial-dir".to_string(), p.dir.display().to_string()])
                .into_iter()
                .flatten(),
        )
        .args(["--batch-ms".to_string(), args.batch_ms.to_string()])
        .args(["--threads".to_string(), args.threads.to_string()])
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
    let result = rt.block_on(run(&args, netconsole, ptys.as_ref(), &http, pid));
    drop(child.stdin.take());
    let _ = child.wait();
    drop(ptys);
    println!("{result}");
}

async fn run(
    args: &Args,
    netconsole: std::net::SocketAddr,
    ptys: Option<&pty::Ptys>,
    http: &str,
    pid: u32,
) -> String {
    let n = args.consoles;
    let chunk = (args.baud / 10 * args.chunk_ms / 1000).max(24) as usize;
    let epoch = Instant::now();
    let http_client = reqwest::Client::new();
    let mut consoles = Vec::with_capacity(n);
    let latencies = Arc::new(Mutex::new(Vec::<u32>::new()));
    let recording = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    for i in 0..n {
        let mut c = match ptys {
            Some(p) => Console::Pty(p.master(i)),
            None => {
                let c = TcpStream::connect(netconsole).await.unwrap();
                c.set_nodelay(true).unwrap();
                Console::Tcp(c)
            }
        };
        c.write_all(format!("SALAD.machine_id=bench-{i}\n").as_bytes())
            .await;
        consoles.push(c);
    }
    for i in 0..n {
        // The multiplexer finds a serial port at its next scan and reads
        // the id line after: wait for the machine (bounded).
        let mut attempts = 0;
        let port = loop {
            let r = http_client
                .get(format!("{http}/api/v1/machine/bench-{i}"))
                .send()
                .await
                .unwrap();
            if r.status().is_success() {
                let m: serde_json::Value = r.json().await.unwrap();
                break m["tcp_port"].as_u64().unwrap() as u16;
            }
            attempts += 1;
            assert!(attempts < 300, "machine bench-{i} never appeared");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let mut client = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        client.set_nodelay(true).unwrap();
        let lat = latencies.clone();
        let rec = recording.clone();
        let recv = received.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 16384];
            let mut partial: Vec<u8> = Vec::new();
            let mut local = Vec::new();
            loop {
                let k = match client.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(k) => k,
                };
                let now = epoch.elapsed().as_micros() as u64;
                recv.fetch_add(k as u64, Ordering::Relaxed);
                partial.extend_from_slice(&buf[..k]);
                let mut used = 0;
                while let Some(p) = partial[used..].iter().position(|&b| b == b'\n') {
                    let line = &partial[used..used + p + 1];
                    used += p + 1;
                    if line.len() > 17 && line[0] == b'T' {
                        if let Some(sent) = std::str::from_utf8(&line[1..17])
                            .ok()
                            .and_then(|s| u64::from_str_radix(s, 16).ok())
                        {
                            local.push(now.saturating_sub(sent) as u32);
                        }
                    }
                }
                partial.drain(..used);
                if rec.load(Ordering::Relaxed) && !local.is_empty() {
                    lat.lock().unwrap().append(&mut local);
                }
                local.clear();
            }
        });
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
    let mut sent_chunks: u64 = 0;
    let mut measuring = false;
    let mut t0 = Instant::now();
    let (mut s0, mut m0, mut own0, mut load0) = (ProcSample::default(), (0, 0), 0.0, String::new());
    let mut line = vec![b'.'; chunk];
    *line.last_mut().unwrap() = b'\n';
    while start.elapsed() < total {
        if !measuring && start.elapsed() >= warmup {
            measuring = true;
            recording.store(true, Ordering::Relaxed);
            s0 = sample(pid);
            m0 = machine_cpu();
            own0 = own_cpu();
            load0 = load_average();
            t0 = Instant::now();
            sent_bytes = 0;
            sent_chunks = 0;
            received.store(0, Ordering::Relaxed);
        }
        interval.tick().await;
        let slot = tick % ticks_per_period;
        let mut i = slot as usize;
        while i < n {
            let ts = epoch.elapsed().as_micros() as u64;
            line[0] = b'T';
            line[1..17].copy_from_slice(format!("{ts:016x}").as_bytes());
            consoles[i].write_all(&line).await;
            sent_bytes += line.len() as u64;
            sent_chunks += 1;
            i += ticks_per_period as usize;
        }
        tick += 1;
    }
    let wall = t0.elapsed().as_secs_f64();
    let s1 = sample(pid);
    let m1 = machine_cpu();
    let own = own_cpu() - own0;
    let load1 = load_average();
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

    let user = (s1.user_ticks - s0.user_ticks) as f64 / TICKS_PER_SEC;
    let system = (s1.system_ticks - s0.system_ticks) as f64 / TICKS_PER_SEC;
    let cpu = user + system;
    let nominal = n as f64 * (args.baud / 10) as f64;
    let offered = sent_bytes as f64 / wall;
    let shortfall = if offered < 0.95 * nominal {
        format!(
            "\nWARNING: the load generator offered only {:.0}% of the nominal rate (it did not get enough CPU): \
             the figures are not comparable; {}",
            100.0 * offered / nominal,
            if args.realtime {
                "the multiplexer and the generator together need more CPU than this machine has"
            } else {
                "run with --realtime"
            }
        )
    } else {
        String::new()
    };
    let chunks = sent_chunks.max(1) as f64;
    let ncpu = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as f64;
    let (busy, all) = (m1.0 - m0.0, (m1.1 - m0.1).max(1));
    let machine_busy = busy as f64 / all as f64 * ncpu;
    let others = (machine_busy - (cpu + own) / wall).max(0.0);
    let syscalls = match (s0.syscalls, s1.syscalls) {
        (Some((r0, w0)), Some((r1, w1))) => format!(
            "{:.3} read() + {:.3} write() per chunk (files and pipes: the kernel does not count socket send/recv here)",
            (r1 - r0) as f64 / chunks,
            (w1 - w0) as f64 / chunks
        ),
        _ => "not accounted by this kernel".into(),
    };
    let mode = format!(
        "{}{}{}",
        if args.serial {
            ", serial ports (ptys)"
        } else {
            ", netconsoles"
        },
        if args.realtime { ", SCHED_FIFO" } else { "" },
        if args.floor {
            format!(
                ", FLOOR: bare epoll forwarder, {} ms batching",
                args.batch_ms
            )
        } else if args.multi_thread {
            ", multi-thread runtime".to_string()
        } else {
            format!(
                ", {} thread(s), {} ms batching",
                args.threads, args.batch_ms
            )
        }
    );
    format!(
        "salad-bench: {n} consoles at {} baud ({} B/s each, {chunk}-byte chunks every {} ms), {:.1} s measured{}\n\
         offered {:.2} MB/s ({:.0} chunks/s), delivered {:.2} MB/s to {n} read-write clients\n\
         salad CPU: {:.1}% of one core ({:.2} s CPU over {:.1} s, {:.2} us per chunk: {:.2} us user, {:.2} us system)\n\
         salad I/O calls: {syscalls}; context switches per chunk: {:.3} voluntary, {:.3} involuntary\n\
         byte->client latency over {} chunks: p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms\n\
         machine: load average {load0} -> {load1}; salad threads waited {:.1} ms/s for a CPU; \
         load generator used {:.0}% of a core, other processes {:.0}% ({} CPUs){shortfall}",
        args.baud,
        args.baud / 10,
        args.chunk_ms,
        wall,
        mode,
        sent_bytes as f64 / wall / 1e6,
        sent_chunks as f64 / wall,
        recv as f64 / wall / 1e6,
        100.0 * cpu / wall,
        cpu,
        wall,
        cpu * 1e6 / chunks,
        user * 1e6 / chunks,
        system * 1e6 / chunks,
        (s1.voluntary_cs - s0.voluntary_cs) as f64 / chunks,
        (s1.involuntary_cs - s0.involuntary_cs) as f64 / chunks,
        lat.len(),
        pct(0.5),
        pct(0.99),
        pct(0.999),
        lat.last().copied().unwrap_or(0) as f64 / 1000.0,
        (s1.run_delay_ns.saturating_sub(s0.run_delay_ns)) as f64 / 1e6 / wall,
        100.0 * own / wall,
        100.0 * others,
        ncpu,
    )
}

/// A simulated console, as the load generator sees it.
enum Console {
    Tcp(TcpStream),
    Pty(tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>),
}

impl Console {
    async fn write_all(&mut self, mut buf: &[u8]) {
        match self {
            Console::Tcp(c) => c.write_all(buf).await.unwrap(),
            Console::Pty(fd) => {
                while !buf.is_empty() {
                    let mut ready = fd.writable().await.unwrap();
                    if let Ok(r) = ready.try_io(|fd| {
                        use std::os::fd::AsRawFd;
                        // SAFETY: write from a valid buffer to an open
                        // descriptor.
                        let k =
                            unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
                        if k < 0 {
                            Err(std::io::Error::last_os_error())
                        } else {
                            Ok(k as usize)
                        }
                    }) {
                        buf = &buf[r.expect("writing to a pty master")..];
                    }
                }
            }
        }
    }
}

/// Prefix of the pty links the multiplexer's serial glob matches.
const PTY_LINK_PREFIX: &str = "ttyBENCH";

/// The pseudo-terminal pairs of `--serial`.
mod pty {
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::path::PathBuf;

    pub struct Ptys {
        /// Directory of the links `ttyBENCH<i>` → `/dev/pts/<n>`.
        pub dir: PathBuf,
        /// (master, slave) of each console. The slave stays open here too,
        /// so the pair lives until the bench ends whatever the multiplexer
        /// does with its side.
        pairs: Vec<(OwnedFd, OwnedFd)>,
    }

    impl Ptys {
        /// `n` pairs in raw mode (no echo, no line editing: a serial line),
        /// masters non-blocking.
        pub fn open(n: usize) -> Ptys {
            let dir = std::env::temp_dir().join(format!("salad-bench-ptys-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let mut pairs = Vec::with_capacity(n);
            for i in 0..n {
                let vivian_salad::tty::PtyPair {
                    master,
                    slave,
                    slave_path,
                } = vivian_salad::tty::pty_pair()
                    .unwrap_or_else(|e| panic!("openpty (console {i}): {e}"));
                // SAFETY: fcntl on an open descriptor.
                unsafe {
                    let fl = libc::fcntl(master.as_raw_fd(), libc::F_GETFL);
                    libc::fcntl(master.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
                }
                std::os::unix::fs::symlink(
                    &slave_path,
                    dir.join(format!("{}{i}", super::PTY_LINK_PREFIX)),
                )
                .unwrap();
                pairs.push((master, slave));
            }
            Ptys { dir, pairs }
        }

        /// The master side of console `i`, for the load generator (a
        /// duplicate descriptor, registered with the current runtime).
        pub fn master(&self, i: usize) -> tokio::io::unix::AsyncFd<OwnedFd> {
            let fd = self.pairs[i].0.try_clone().unwrap();
            // SAFETY: the AsyncFd owns the descriptor: it stays open and the
            // same until the AsyncFd is dropped.
            unsafe { tokio::io::unix::AsyncFd::register(fd) }
                .map_err(|e| e.into_parts().1)
                .unwrap()
        }
    }

    impl Drop for Ptys {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The floor: a bare forwarder under the same load (see the module docs).
mod floor {
    use std::collections::HashMap;
    use std::fs::File;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::os::unix::fs::OpenOptionsExt;
    use std::sync::mpsc;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    /// Machine id → its client port.
    type Ports = Arc<Mutex<HashMap<String, u16>>>;

    /// Serve netconsoles, and with `serial_dir` the pty slaves linked
    /// there (opened as a serial port is: `O_NOCTTY`, raw mode set by the
    /// generator), each read with a plain `read`.
    pub fn serve(batch: Duration, serial_dir: Option<&str>) {
        let netconsole = TcpListener::bind("127.0.0.1:0").unwrap();
        let http = TcpListener::bind("127.0.0.1:0").unwrap();
        println!(
            "READY {} {}",
            netconsole.local_addr().unwrap(),
            http.local_addr().unwrap()
        );
        let ports: Ports = Arc::default();
        let (pairs_tx, pairs_rx) = mpsc::channel::<(File, TcpStream)>();
        std::thread::spawn(move || forward(pairs_rx, batch));
        for entry in serial_dir
            .map(|d| std::fs::read_dir(d).unwrap().flatten().collect::<Vec<_>>())
            .unwrap_or_default()
        {
            if !entry
                .file_name()
                .to_string_lossy()
                .starts_with(super::PTY_LINK_PREFIX)
            {
                continue;
            }
            let tty = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NOCTTY)
                .open(entry.path())
                .unwrap();
            let ports = ports.clone();
            let tx = pairs_tx.clone();
            std::thread::spawn(move || bind_console(tty, &ports, &tx));
        }
        let p = ports.clone();
        std::thread::spawn(move || {
            for c in http.incoming().flatten() {
                let p = p.clone();
                std::thread::spawn(move || answer_http(c, &p));
            }
        });
        std::thread::spawn(move || {
            for console in netconsole.incoming().flatten() {
                let ports = ports.clone();
                let tx = pairs_tx.clone();
                let console = File::from(OwnedFd::from(console));
                std::thread::spawn(move || bind_console(console, &ports, &tx));
            }
        });
        // Exit when the parent closes our stdin.
        let mut buf = [0u8; 16];
        while std::io::stdin()
            .read(&mut buf)
            .map(|n| n > 0)
            .unwrap_or(false)
        {}
    }

    /// Read the console's `SALAD.machine_id=<id>` line, open the machine's
    /// client port, hand the pair to the forwarder once the client came.
    fn bind_console(mut console: File, ports: &Ports, tx: &mpsc::Sender<(File, TcpStream)>) {
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while line.last() != Some(&b'\n') {
            if console.read(&mut b).unwrap_or(0) == 0 {
                return;
            }
            line.push(b[0]);
        }
        let text = String::from_utf8_lossy(&line);
        let Some(id) = text.trim().strip_prefix("SALAD.machine_id=") else {
            return;
        };
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        ports
            .lock()
            .unwrap()
            .insert(id.to_string(), l.local_addr().unwrap().port());
        if let Ok((client, _)) = l.accept() {
            client.set_nodelay(true).unwrap();
            let _ = tx.send((console, client));
        }
    }

    /// `GET /api/v1/machine/<id>` → `{"tcp_port": ...}`, keep-alive.
    fn answer_http(mut c: TcpStream, ports: &Ports) {
        let mut req = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            let Some(end) = req.windows(4).position(|w| w == b"\r\n\r\n") else {
                match c.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
                continue;
            };
            let head = String::from_utf8_lossy(&req[..end]).into_owned();
            req.drain(..end + 4);
            let id = head
                .split_whitespace()
                .nth(1)
                .and_then(|p| p.strip_prefix("/api/v1/machine/"))
                .unwrap_or("")
                .to_string();
            // The console's id line may still be on its way: wait for it
            // (bounded).
            let deadline = Instant::now() + Duration::from_secs(10);
            let port = loop {
                if let Some(p) = ports.lock().unwrap().get(&id) {
                    break Some(*p);
                }
                if Instant::now() > deadline {
                    break None;
                }
                std::thread::sleep(Duration::from_millis(1));
            };
            let (status, body) = match port {
                Some(p) => ("200 OK", format!("{{\"id\":\"{id}\",\"tcp_port\":{p}}}")),
                None => ("404 Not Found", "{}".to_string()),
            };
            let answer = format!(
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            if c.write_all(answer.as_bytes()).is_err() {
                return;
            }
        }
    }

    /// The data path: level-triggered epoll over the consoles; per ready
    /// console one `read` (a `recv` for a netconsole) and one `send` to its
    /// client.
    fn forward(pairs: mpsc::Receiver<(File, TcpStream)>, batch: Duration) {
        // SAFETY: plain epoll calls on descriptors owned by `all`, which
        // outlives every registration.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        assert!(
            ep >= 0,
            "epoll_create1: {}",
            std::io::Error::last_os_error()
        );
        let mut all: Vec<(File, TcpStream)> = Vec::new();
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
        let mut buf = vec![0u8; 8192];
        let mut last_wake = Instant::now();
        loop {
            while let Ok((console, client)) = pairs.try_recv() {
                let mut ev = libc::epoll_event {
                    events: libc::EPOLLIN as u32,
                    u64: all.len() as u64,
                };
                let fd = console.as_raw_fd();
                all.push((console, client));
                // SAFETY: see above.
                let r = unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) };
                assert_eq!(r, 0, "epoll_ctl: {}", std::io::Error::last_os_error());
            }
            let awake = last_wake.elapsed();
            if awake < batch {
                std::thread::sleep(batch - awake);
            }
            // SAFETY: see above; `events` has room for 1024 entries.
            let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), 1024, 10) };
            last_wake = Instant::now();
            for ev in &events[..n.max(0) as usize] {
                let (console, client) = &all[ev.u64 as usize];
                let k = match (&*console).read(&mut buf) {
                    Ok(0) | Err(_) => {
                        // The load generator is done: stop watching it.
                        // SAFETY: see above.
                        unsafe {
                            libc::epoll_ctl(
                                ep,
                                libc::EPOLL_CTL_DEL,
                                console.as_raw_fd(),
                                std::ptr::null_mut(),
                            )
                        };
                        continue;
                    }
                    Ok(k) => k,
                };
                let _ = (&*client).write_all(&buf[..k]);
            }
        }
    }
}
