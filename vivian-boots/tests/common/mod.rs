//! Shared helpers of the integration tests: network namespaces with a veth
//! pair (or a tap), sockets created inside a namespace, real client
//! programs run inside one, all cleaned up by Drop guards.
//!
//! These tests need root (CI runs as root) and the Debian packages listed in
//! `scripts/test-all`; a missing program fails the test with its name.

#![allow(dead_code)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Fails with a clear message when a peer program is missing.
pub fn require(program: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{program} is not installed: install the Debian package `{package}` \
         (scripts/test-all installs it)"
    );
}

/// Fails unless we are root (namespaces, ports 67/69).
pub fn require_root() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "these tests create network namespaces and need root (CI runs as root)"
    );
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace, deleted on drop.
pub struct Netns {
    /// Its name (contains our PID and a sequence number).
    pub name: String,
}

impl Netns {
    /// A new namespace with `lo` up.
    pub fn new(tag: &str) -> Netns {
        require_root();
        let name = format!(
            "vb{tag}{}x{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    /// Runs `f` on a thread that entered this namespace: sockets created
    /// there belong to the namespace and keep working from any thread.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let fd = File::open(&path).expect("open netns");
            let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("thread in netns")
    }

    /// A command run inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs a command inside the namespace with a time limit.
    pub fn run(&self, args: &[&str], limit: Duration) -> Output {
        let mut c = Command::new("timeout");
        c.args([
            "-k",
            "2",
            &format!("{}", limit.as_secs_f64()),
            "ip",
            "netns",
            "exec",
            &self.name,
        ]);
        c.args(args);
        c.stdin(Stdio::null());
        c.output().expect("run command in netns")
    }

    /// `ip -n <ns> args...`
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Two namespaces joined by a veth pair: `v0` (server side, `prefix.1/24`)
/// and `v1` (client side, no address).
pub struct VethPair {
    /// Server side.
    pub srv: Netns,
    /// Client side.
    pub cli: Netns,
    /// e.g. `10.98.3`
    pub prefix: String,
}

impl VethPair {
    /// Creates the pair; `octet` picks the /24 (10.98.<octet>.0/24).
    pub fn new(tag: &str, octet: u8) -> VethPair {
        let srv = Netns::new(&format!("{tag}s"));
        let cli = Netns::new(&format!("{tag}c"));
        ip(&[
            "link", "add", "v0", "netns", &srv.name, "type", "veth", "peer", "name", "v1", "netns",
            &cli.name,
        ]);
        let prefix = format!("10.98.{octet}");
        srv.ip(&["addr", "add", &format!("{prefix}.1/24"), "dev", "v0"]);
        srv.ip(&["link", "set", "v0", "up"]);
        cli.ip(&["link", "set", "v1", "up"]);
        VethPair { srv, cli, prefix }
    }
}

/// A child process killed (by PID) and reaped on drop.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Deterministic pseudo-random content of `len` bytes.
pub fn content(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Initializes logs once (RUST_LOG to see them).
pub fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A tokio runtime for servers started from plain (blocking) tests.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// CPU time (user + system) from `getrusage(who)`.
pub fn rusage_cpu(who: libc::c_int) -> Duration {
    // SAFETY: getrusage fills the struct we own.
    let mut r: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(who, &mut r) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(r.ru_utime) + tv(r.ru_stime)
}

/// CPU time of process `pid` and of its waited-for children, from
/// `/proc/<pid>/stat` (clock-tick resolution, usually 10 ms).
pub fn proc_cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime is field 14.
    let rest = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let ticks: u64 = f.get(11..15).map(|s| s.iter().sum()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_nanos(ticks * 1_000_000_000 / hz)
}
