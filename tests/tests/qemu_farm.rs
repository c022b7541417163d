//! A farm of real (virtual) PCs: QEMU VMs behind `vpdu --dut qemu`, booting
//! Debian's kernel and the busybox initramfs of `scripts/build-dut-image`
//! through our DHCP, TFTP and `boot.ipxe`, their serial consoles through
//! our `salad`, jobs submitted with our `executorctl`.
//!
//! Needs root (a network namespace with a bridge, taps) and QEMU (Debian's
//! qemu-system-x86 and ipxe-qemu); the image needs apt-get download (the
//! first run only; it is cached under /var/tmp/vivian-dut-image).
//!
//! One test, `qemu_duts_are_discovered_trained_and_run_user_jobs`, covers
//! a farm's whole life (discovery, registration, training with the stock
//! templates, a PASS and a FAIL user job): each VM boots 5 times, about
//! 20 s each under TCG, so one test rather than several keeps CI fast.
//! `--nocapture` shows its timings (wall time, power ON to the first
//! console line); `QEMU_FARM_KEEP_LOGS=1` keeps the logs and consoles of a
//! passing run too (a failing run always keeps them, in the temp dir).
//!
//! Everything runs in a network namespace of this test's own thread
//! (`unshare(CLONE_NEWNET)`): it is anonymous and disappears with the
//! processes started in it, which are all stopped at the end (or on a
//! failure; their logs are printed then).

use std::io::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

// The binaries are found as the other farm tests find them.
#[path = "../../bins/tests/process_support/mod.rs"]
mod process_support;
use process_support::farm::bin;

/// The farm's private network (the bridge in the namespace).
const BRIDGE: &str = "br0";
const SERVER_IP: &str = "10.42.0.1";
const MACS: [&str; 2] = ["52:54:00:11:22:00", "52:54:00:11:22:01"];
const EXECUTOR_PORT: u16 = 80;
const FILES_PORT: u16 = 9000;
const VPDU_PORT: u16 = 9191;

/// A child process stopped with SIGTERM (then SIGKILL after 5 s) on drop.
struct Proc {
    name: &'static str,
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let pid = self.child.id() as i32;
        // SAFETY: kill(2) of our own child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("{} ignored SIGTERM: killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Builds (or finds in the cache) the DUT image; its folder.
fn dut_image() -> PathBuf {
    let out = Command::new(repo_root().join("scripts/build-dut-image"))
        .stderr(Stdio::inherit())
        .output()
        .expect("scripts/build-dut-image runs");
    assert!(
        out.status.success(),
        "scripts/build-dut-image failed (it needs apt-get, dpkg-deb and cpio)"
    );
    let dir = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    let dir = PathBuf::from(dir);
    for f in ["vmlinuz", "initramfs.cpio.gz", "tftp/undionly.kpxe"] {
        assert!(
            dir.join(f).is_file(),
            "the image has no {f} in {}",
            dir.display()
        );
    }
    dir
}

/// Moves this thread (and so every process it starts) into a new, empty
/// network namespace, with `lo` and the farm's bridge up.
fn enter_private_network() {
    // SAFETY: unshare(2) of the calling thread's network namespace.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "unshare(CLONE_NEWNET): {}",
        std::io::Error::last_os_error()
    );
    run("ip", &["link", "set", "lo", "up"]);
    run("ip", &["link", "add", BRIDGE, "type", "bridge"]);
    run(
        "ip",
        &["addr", "add", &format!("{SERVER_IP}/24"), "dev", BRIDGE],
    );
    // A link-local source for the router advertisements below.
    run(
        "ip",
        &["-6", "addr", "add", "fe80::1/64", "dev", BRIDGE, "nodad"],
    );
    run("ip", &["link", "set", BRIDGE, "up"]);
}

/// Sends an IPv6 router advertisement on the bridge every 500 ms until
/// `stop`: iPXE waits ~13 s for one after its DHCP otherwise (a farm's
/// gateway has a router on the link). No prefix, lifetime 0: nobody
/// configures anything from it.
fn router_advertisements(stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    // Not from /sys: sysfs shows the namespace that mounted it.
    let name = std::ffi::CString::new(BRIDGE).unwrap();
    // SAFETY: a valid C string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert_ne!(index, 0, "no {BRIDGE} in the test's namespace");
    let s = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))
        .expect("raw ICMPv6 socket (root)");
    s.set_multicast_if_v6(index).unwrap();
    s.set_multicast_hops_v6(255).unwrap();
    s.set_multicast_loop_v6(false).unwrap();
    let to = SockAddr::from(std::net::SocketAddrV6::new(
        "ff02::1".parse().unwrap(),
        0,
        0,
        index,
    ));
    // Type 134, code 0, checksum (the kernel fills it), hop limit 64,
    // flags 0, router lifetime 0, reachable time 0, retransmit timer 0.
    let ra = [134u8, 0, 0, 0, 64, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let _ = s.send_to(&ra, &to);
            std::thread::sleep(Duration::from_millis(500));
        }
    })
}

fn wait_http(url: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if reqwest::blocking::get(url).is_ok_and(|r| r.status().is_success()) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{what} never answered at {url}");
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The farm: every process, their logs; prints the logs if the test fails.
struct Farm {
    dir: tempfile::TempDir,
    api: String,
    procs: Vec<Proc>,
    ra_stop: Arc<AtomicBool>,
    ra: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Farm {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for log in ["pass.out", "fail.out"] {
                eprintln!(
                    "----- {log} (last 40 lines) -----\n{}",
                    tail(&self.dir.path().join(log), 40)
                );
            }
            for log in ["executor", "vpdu", "salad"] {
                eprintln!(
                    "----- {log} log (last 60 lines) -----\n{}",
                    tail(&self.dir.path().join(format!("{log}.log")), 60)
                );
            }
        }
        if std::thread::panicking() || std::env::var_os("QEMU_FARM_KEEP_LOGS").is_some() {
            // Keep the logs and consoles for a post-mortem (small files).
            let keep = std::env::temp_dir().join(format!("qemu-farm-logs-{}", std::process::id()));
            let _ = Command::new("cp")
                .arg("-a")
                .arg(self.dir.path())
                .arg(&keep)
                .status();
            eprintln!("logs and consoles kept in {}", keep.display());
        }
        // The executor first (it drives the PDU), then the VMs' vpdu.
        while let Some(p) = self.procs.pop() {
            drop(p);
        }
        self.ra_stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.ra.take() {
            let _ = t.join();
        }
    }
}

fn log_file(dir: &Path, name: &str) -> std::fs::File {
    std::fs::File::create(dir.join(format!("{name}.log"))).unwrap()
}

impl Farm {
    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn get(&self, path: &str) -> Value {
        let r = reqwest::blocking::get(format!("{}{path}", self.api))
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        assert!(r.status().is_success(), "GET {path}: {}", r.status());
        r.json().unwrap()
    }

    /// Runs `job` with `executorctl run`; its exit code and stdout.
    fn run_job(&self, name: &str, job: &str) -> (Option<i32>, String) {
        let file = self.path(&format!("{name}.yml.j2"));
        std::fs::write(&file, job).unwrap();
        let out = Command::new(bin("executorctl"))
            .args(["-e", &self.api, "run"])
            .arg(&file)
            .stdin(Stdio::null())
            .output()
            .expect("executorctl runs");
        let stdout = format!(
            "{}\n----- executorctl stderr -----\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(self.path(&format!("{name}.out")), &stdout).unwrap();
        (out.status.code(), stdout)
    }
}

/// Starts the farm: files (the "MinIO"), salad, vpdu with two QEMU outlets,
/// the executor (REST, DHCP, TFTP) on the bridge, with `mars_db`.
fn start_farm(image: &Path, mars_db: &str, extra_env: &[(&str, &str)]) -> Farm {
    let dir = tempfile::Builder::new()
        .prefix("qemu-farm")
        .tempdir()
        .unwrap();
    let ra_stop = Arc::new(AtomicBool::new(false));
    let mut farm = Farm {
        api: format!("http://{SERVER_IP}:{EXECUTOR_PORT}"),
        procs: Vec::new(),
        ra: Some(router_advertisements(ra_stop.clone())),
        ra_stop,
        dir,
    };
    let d = farm.dir.path().to_path_buf();

    // The boot artifacts, over HTTP (see artifacts_url).
    let boot = d.join("www/boot/vivian-dut");
    std::fs::create_dir_all(&boot).unwrap();
    for f in ["vmlinuz", "initramfs.cpio.gz"] {
        std::os::unix::fs::symlink(image.join(f), boot.join(f)).unwrap();
    }
    farm.procs.push(Proc {
        name: "file server",
        child: Command::new("python3")
            .args(["-m", "http.server", "--bind", SERVER_IP])
            .arg(FILES_PORT.to_string())
            .current_dir(d.join("www"))
            .stdout(Stdio::null())
            .stderr(log_file(&d, "files"))
            .spawn()
            .expect("python3 runs"),
    });
    wait_http(
        &format!("http://{SERVER_IP}:{FILES_PORT}/boot/vivian-dut/vmlinuz"),
        "the file server",
    );

    let salad_port = free_port();
    let netconsole_port = free_port();
    farm.procs.push(Proc {
        name: "salad",
        child: Command::new(bin("salad"))
            .env("SALAD_PORT", salad_port.to_string())
            .env("SALAD_TCPCONSOLE_PORT", netconsole_port.to_string())
            .env("SALAD_TCPCONSOLE_HOST", "127.0.0.1")
            .env("SALAD_MACHINE_HOST", "127.0.0.1")
            .env("SALAD_LOG_DIR", d.join("consoles"))
            .env("SALAD_SERIAL_GLOBS", "")
            .stdout(Stdio::null())
            .stderr(log_file(&d, "salad"))
            .spawn()
            .expect("salad starts"),
    });
    wait_http(
        &format!("http://127.0.0.1:{salad_port}/api/v1/machine"),
        "salad",
    );

    farm.procs.push(Proc {
        name: "vpdu",
        child: Command::new(bin("vpdu"))
            .args(["--host", "127.0.0.1", "--port", &VPDU_PORT.to_string()])
            .args(["--num-ports", "2", "--dut", "qemu", "--bridge", BRIDGE])
            .args(["--salad-console-port", &netconsole_port.to_string()])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log_file(&d, "vpdu"))
            .spawn()
            .expect("vpdu starts"),
    });

    // The executor starts with the PDU reachable (it retries otherwise,
    // but a discovery before it has the ports is refused).
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", VPDU_PORT)).is_err() {
        assert!(
            Instant::now() < deadline,
            "vpdu never listened on 127.0.0.1:{VPDU_PORT}:\n{}",
            tail(&d.join("vpdu.log"), 20)
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let db = d.join("mars_db.yaml");
    std::fs::write(&db, mars_db).unwrap();
    let mut executor = Command::new(bin("executor"));
    executor
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        // vivian::http at debug: the firmware's boot.ipxe requests are logged.
        .env("RUST_LOG", "info,vivian::http=debug")
        .env("FARM_NAME", "qemu-farm")
        .env("MARS_DB_FILE", &db)
        .env("EXECUTOR_HOST", "0.0.0.0")
        .env("EXECUTOR_PORT", EXECUTOR_PORT.to_string())
        .env("EXECUTOR_URL", &farm.api)
        .env("PRIVATE_INTERFACE", BRIDGE)
        .env("BOOTS_TFTP_ROOT", image.join("tftp"))
        .env("SALAD_URL", format!("http://127.0.0.1:{salad_port}"))
        .env("GITLAB_CONF_FILE", d.join("gitlab-runner.toml"));
    for (k, v) in extra_env {
        executor.env(k, v);
    }
    farm.procs.push(Proc {
        name: "executor",
        child: executor
            .stdout(Stdio::null())
            .stderr(log_file(&d, "executor"))
            .spawn()
            .expect("executor starts"),
    });
    wait_http(&format!("{}/api/v1/duts", farm.api), "the executor");
    farm
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Where the file server has the image (what MinIO serves in a real farm).
fn artifacts_url() -> String {
    format!("http://{SERVER_IP}:{FILES_PORT}/boot/vivian-dut")
}

/// A user job on `mac`: boots the image and runs `command` (a kernel
/// command line item); PASS when the console shows `JOB_RESULT=pass`.
/// `session_end: None` keeps the reference's default pattern (a kernel's
/// "reboot: Power Down" line), which the image prints when it powers off.
fn user_job(mac: &str, command: &str, session_end: Option<&str>) -> String {
    let files = artifacts_url();
    let session_end = session_end
        .map(|re| format!("  session_end: {{regex: \"{re}\"}}\n"))
        .unwrap_or_default();
    format!(
        r#"version: 1
target: {{id: "{mac}"}}
timeouts:
  overall: {{minutes: 2}}
  first_console_activity: {{seconds: 30}}
console_patterns:
{session_end}  job_success: {{regex: "^JOB_RESULT=pass\r?$"}}
deployment:
  start:
    kernel:
      url: "{files}/vmlinuz"
      cmdline:
        - "console={{{{ local_tty_device }}}},115200 quiet"
        - "SALAD.machine_id={{{{ machine_id }}}}"
        - {command}
    initramfs:
      url: "{files}/initramfs.cpio.gz"
"#
    )
}

/// What the API says about a DUT at one moment: its state and, while it
/// trains, Sergent Hartman's progress.
fn snapshot(dut: &Value) -> String {
    let state = dut["state"].as_str().unwrap_or("?");
    let t = &dut["training"];
    match t["state"].as_str() {
        Some("IDLE") | None => state.to_string(),
        Some(training) => format!(
            "{state}/{training} registered={} loops={} pass={}",
            t["is_registered"],
            t["current_loop_count"],
            t["statuses"]["PASS"].as_u64().unwrap_or(0)
        ),
    }
}

/// Records every change of the DUTs' [`snapshot`]s, sampled every 50 ms
/// from the API (a DUT that does not exist yet records nothing).
struct StateLog {
    seen: Arc<std::sync::Mutex<Vec<Vec<String>>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StateLog {
    fn start(api: String) -> StateLog {
        let seen = Arc::new(std::sync::Mutex::new(vec![Vec::new(); MACS.len()]));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (seen, stop) = (seen.clone(), stop.clone());
            std::thread::spawn(move || {
                let client = reqwest::blocking::Client::builder()
                    .timeout(Duration::from_secs(5))
                    .build()
                    .unwrap();
                loop {
                    // The flag is read before sampling: the last sample
                    // comes after whatever made the test stop.
                    let last_round = stop.load(Ordering::Relaxed);
                    for (i, mac) in MACS.iter().enumerate() {
                        let s = client
                            .get(format!("{api}/api/v1/dut/{mac}"))
                            .send()
                            .ok()
                            .filter(|r| r.status().is_success())
                            .and_then(|r| r.json::<Value>().ok())
                            .map(|v| snapshot(&v));
                        if let Some(s) = s {
                            let mut seen = seen.lock().unwrap();
                            if seen[i].last() != Some(&s) {
                                seen[i].push(s);
                            }
                        }
                    }
                    if last_round {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        };
        StateLog {
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn last(&self, dut: usize) -> Option<String> {
        self.seen.lock().unwrap()[dut].last().cloned()
    }

    /// Waits until the recorder has seen DUT `dut` in `want`.
    fn wait_for(&self, dut: usize, want: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let last = self.last(dut);
            if last.as_deref() == Some(want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} is {last:?}, not {want}, after {timeout:?}; it went through {:?}",
                MACS[dut],
                self.seen.lock().unwrap()[dut]
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops recording (after one last sample); what was seen.
    fn finish(mut self) -> Vec<Vec<String>> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for StateLog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The "first console line N s after power ON" figures of vpdu's log.
fn first_console_line_times(vpdu_log: &Path) -> Vec<f64> {
    std::fs::read_to_string(vpdu_log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let rest = l.split("first console line ").nth(1)?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .collect()
}

fn preflight() {
    // SAFETY: geteuid(2) has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the QEMU farm test needs root (network namespace, bridge, taps): run it as root (CI does)"
    );
    let qemu = Command::new("qemu-system-x86_64").arg("--version").output();
    assert!(
        qemu.is_ok_and(|o| o.status.success()),
        "qemu-system-x86_64 is missing: apt-get install qemu-system-x86 ipxe-qemu (scripts/test-all does)"
    );
    assert!(
        Path::new("/usr/lib/ipxe/qemu/efi-virtio.rom").exists()
            || Path::new("/usr/share/qemu/efi-virtio.rom").exists(),
        "QEMU's iPXE ROMs are missing: apt-get install ipxe-qemu"
    );
}

/// The whole life of two new machines in a farm of QEMU PCs: discovered
/// through `POST /api/v1/dut/discover` (their outlet powers them on, they
/// netboot the default boot configuration, their DHCP request creates
/// them on that outlet), trained by Sergent Hartman with the stock
/// registration and boot-loop templates (boot count 2), then given one
/// user job each with `executorctl` at the same time: one PASS, one FAIL
/// by console pattern. Every state the API shows is recorded and checked.
#[test]
fn qemu_duts_are_discovered_trained_and_run_user_jobs() {
    let t0 = Instant::now();
    preflight();
    let image = dut_image();
    let built = t0.elapsed();
    enter_private_network();

    let files = artifacts_url();
    let kernel = format!("{files}/vmlinuz");
    let initramfs = format!("{files}/initramfs.cpio.gz");
    let farm = start_farm(
        &image,
        &format!(
            "pdus:\n  VPDU:\n    driver: vpdu\n    config:\n      hostname: 127.0.0.1:{VPDU_PORT}\nduts: {{}}\n"
        ),
        &[
            ("SERGENT_HARTMAN_BOOT_COUNT", "2"),
            ("SERGENT_HARTMAN_QUALIFYING_BOOT_COUNT", "2"),
            ("SERGENT_HARTMAN_QUICK_CHECK", "disabled"),
            // The stock templates (compiled into the executor), booting
            // this image: only their variables differ from a real farm's.
            ("EXECUTOR_JOB__TRAINING_KERNEL_URL", &kernel),
            ("EXECUTOR_JOB__TRAINING_INITRAMFS_URL", &initramfs),
            // What an unknown machine boots (the reference's default boot
            // configuration: the registration container).
            ("BOOTS_DEFAULT_KERNEL", &kernel),
            ("BOOTS_DEFAULT_INITRD", &initramfs),
            (
                "BOOTS_DEFAULT_CMDLINE",
                "console=ttyS0,115200 quiet b2c.container=\"docker://machine_registration:latest register\"",
            ),
        ],
    );
    let ready = t0.elapsed();
    let states = StateLog::start(farm.api.clone());
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();

    // The executor knows the PDU's outlets (a discovery is refused before).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let pdu = farm.get("/api/v1/pdu/VPDU");
        let ports = &pdu["ports"];
        let n = ports
            .as_object()
            .map(|o| o.len())
            .or_else(|| ports.as_array().map(Vec::len))
            .unwrap_or(0);
        if n >= MACS.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the executor does not know VPDU's outlets after 30 s: {pdu}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Discovery, one outlet at a time (one discovery runs at once): the
    // machine exists, on its outlet, once it has netbooted.
    for (i, mac) in MACS.iter().enumerate() {
        let r = client
            .post(format!("{}/api/v1/dut/discover", farm.api))
            .json(&serde_json::json!({"pdu": "VPDU", "port_id": i.to_string()}))
            .send()
            .unwrap();
        let status = r.status();
        let text = r.text().unwrap_or_default();
        assert!(status.is_success(), "discover port {i}: {status} {text}");
        assert!(
            text.contains(&format!("Booting machine behind port {i} on PDU \"VPDU\"")),
            "discover port {i}: {text}"
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        let dut = loop {
            let r = client
                .get(format!("{}/api/v1/dut/{mac}", farm.api))
                .send()
                .unwrap();
            if r.status().is_success() {
                break r.json::<Value>().unwrap();
            }
            assert!(
                Instant::now() < deadline,
                "{mac} was not discovered on port {i} within 60 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        assert_eq!(dut["pdu"]["name"], "VPDU", "{dut}");
        assert_eq!(dut["pdu"]["port_id"], i.to_string(), "{dut}");
        assert_eq!(dut["ready_for_service"], false, "{dut}");
        // The discovery is over: the next one can start.
        let d = farm.get("/api/v1/dut/discover");
        assert!(
            d.is_null() || d.as_object().is_some_and(|o| o.is_empty()),
            "the discovery of port {i} is still running: {d}"
        );
    }
    let discovered = t0.elapsed();

    // Training: registration, 2 boot loops each, then IDLE; what the
    // machine registered about itself.
    let trained = |i: usize| -> String {
        let mac = MACS[i];
        states.wait_for(i, "IDLE", Duration::from_secs(180));
        let dut = farm.get(&format!("/api/v1/dut/{mac}"));
        assert_eq!(dut["ready_for_service"], true, "{dut}");
        assert_eq!(dut["base_name"], "virtio", "{dut}");
        assert_eq!(dut["local_tty_device"], "ttyS0", "{dut}");
        assert_eq!(dut["mac_address"], mac, "{dut}");
        assert_eq!(dut["pdu"]["port_id"], i.to_string(), "{dut}");
        assert!(
            dut["tags"]
                .as_array()
                .is_some_and(|t| t.iter().any(|t| t == "virtio:family:VIRTIO")),
            "{dut}"
        );
        // The address our DHCP server gave it.
        let ip = dut["ip_address"].as_str().unwrap_or_default().to_string();
        assert!(
            ip.starts_with("10.42.0.") && ip != SERVER_IP,
            "{mac} registered the address {ip:?}: {dut}"
        );
        eprintln!(
            "qemu_farm: {mac} trained after {:.1} s",
            t0.elapsed().as_secs_f64()
        );
        ip
    };

    // Then one user job each, submitted with executorctl as soon as the
    // DUT is ready: one PASS (ended by the reference's default
    // session_end), one FAIL by pattern.
    let ((pass_ip, pass), (fail_ip, fail)) = std::thread::scope(|s| {
        let pass = s.spawn(|| {
            let ip = trained(0);
            let job = user_job(
                MACS[0],
                r#""b2c.container=\"docker://registry.example.invalid/busybox:latest sh -c 'uname -r; echo JOB_RESULT=pass'\"""#,
                None,
            );
            (ip, farm.run_job("pass", &job))
        });
        let fail = s.spawn(|| {
            let ip = trained(1);
            let job = user_job(
                MACS[1],
                r#""vivian.run=\"echo JOB_RESULT=fail; exit 3\"""#,
                Some("^It's now safe to turn off your computer\\r?$"),
            );
            (ip, farm.run_job("fail", &job))
        });
        (pass.join().unwrap(), fail.join().unwrap())
    });
    for i in 0..MACS.len() {
        states.wait_for(i, "IDLE", Duration::from_secs(20));
    }
    let jobs_done = t0.elapsed();
    let seen = states.finish();

    let (code, out) = pass;
    assert_eq!(code, Some(0), "the PASS job must exit 0:\n{out}");
    // A real boot: firmware, iPXE through our DHCP and boot.ipxe, Debian's
    // kernel, our /init with the command's output, the power-down line of
    // the reference's default session_end.
    for want in [
        "SeaBIOS",
        "iPXE",
        "SALAD.machine_id=52:54:00:11:22:00",
        "+ sh -c 'uname -r; echo JOB_RESULT=pass'",
        "-amd64\r\n",
        "JOB_RESULT=pass",
        "Execution is over, pipeline status: 0",
        format!("vivian-dut: eth0 {pass_ip} from {SERVER_IP}").as_str(),
        "] reboot: Power Down\n",
    ] {
        assert!(
            out.contains(want),
            "the PASS job's console lacks {want:?}:\n{out}"
        );
    }
    let kernel_version = std::fs::read_to_string(image.join("kernel-version")).unwrap();
    assert!(
        out.contains(kernel_version.trim()),
        "uname -r is not Debian's kernel:\n{out}"
    );
    let (code, out) = fail;
    assert_eq!(code, Some(3), "the FAIL job must exit 3 (FAIL):\n{out}");
    for want in [
        "JOB_RESULT=fail",
        "Execution is over, pipeline status: 3",
        format!("vivian-dut: eth0 {fail_ip} from {SERVER_IP}").as_str(),
    ] {
        assert!(
            out.contains(want),
            "the FAIL job's console lacks {want:?}:\n{out}"
        );
    }

    // Every state each DUT went through, in order: created in training by
    // its discovery boot's DHCP request, registering, then running
    // qualifying loop 1, loop 2 (loop 1 passed), IDLE once loop 2 passed,
    // the user job, IDLE ("loops" counts the loops started).
    let expected = [
        "TRAINING/ENROLLING registered=false loops=0 pass=0",
        "TRAINING/ENROLLING registered=true loops=1 pass=0",
        "TRAINING/ENROLLING registered=true loops=2 pass=1",
        "IDLE",
        "RUNNING",
        "IDLE",
    ];
    // Allowed in between, if sampled: the moments between two training
    // jobs, and a user job waiting for its DUT.
    let optional = [
        "TRAINING/ENROLLING registered=true loops=0 pass=0",
        "TRAINING/ENROLLING registered=true loops=1 pass=1",
        "TRAINING/ENROLLING registered=true loops=2 pass=2",
        "QUEUED",
    ];
    for (mac, seen) in MACS.iter().zip(&seen) {
        // Created, before Sergent Hartman published its progress.
        let seen = match seen.split_first() {
            Some((first, rest)) if first == "TRAINING" => rest,
            _ => &seen[..],
        };
        let mut it = seen.iter();
        assert!(
            expected.iter().all(|w| it.any(|s| s == w)),
            "{mac} went through {seen:#?}, expected {expected:#?} in that order"
        );
        assert!(
            seen.iter()
                .all(|s| expected.contains(&s.as_str()) || optional.contains(&s.as_str())),
            "{mac} went through unexpected states: {seen:#?}"
        );
        assert_eq!(
            seen.first().map(String::as_str),
            Some(expected[0]),
            "{mac}: {seen:#?}"
        );
        assert_eq!(
            seen.last().map(String::as_str),
            Some("IDLE"),
            "{mac}: {seen:#?}"
        );
    }

    // The firmware asked our executor for its boot script.
    let executor_log = std::fs::read_to_string(farm.path("executor.log")).unwrap();
    for mac in MACS {
        let encoded = mac.replace(':', "%3A");
        assert!(
            executor_log.contains(&format!("/boot/{mac}/boot.ipxe"))
                || executor_log.contains(&format!("/boot/{encoded}/boot.ipxe")),
            "{mac} never fetched boot.ipxe from the executor"
        );
    }
    // Each DUT booted 5 times: discovery, registration, 2 loops, user job.
    let mut first_lines = first_console_line_times(&farm.path("vpdu.log"));
    assert!(
        first_lines.len() >= 10,
        "vpdu logged {} first console lines, expected one per boot (10):\n{}",
        first_lines.len(),
        tail(&farm.path("vpdu.log"), 30)
    );
    drop(farm);
    first_lines.sort_by(f64::total_cmp);
    let mut report = std::io::stderr().lock();
    let _ = writeln!(
        report,
        "qemu_farm: wall time {:.1} s: image {:.1} s, farm up {:.1} s, both discovered {:.1} s, \
         both user jobs done {:.1} s; power ON to first console line \
         over {} boots: min {:.2} s, median {:.2} s, max {:.2} s",
        t0.elapsed().as_secs_f64(),
        built.as_secs_f64(),
        ready.as_secs_f64(),
        discovered.as_secs_f64(),
        jobs_done.as_secs_f64(),
        first_lines.len(),
        first_lines[0],
        first_lines[first_lines.len() / 2],
        first_lines[first_lines.len() - 1],
    );
}
