//! A farm of the real binaries, as an operator runs it: `salad` (the
//! consoles), `vpdu` (a virtual PDU whose outlets power simulated DUTs),
//! `executor` on a MarsDB file, and an HTTP server for the job artifacts
//! (the simulated kernel and initrd). Everything listens on 127.0.0.1 and
//! is stopped when the [`RealFarm`] is dropped.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use super::{free_port, wait_for, Proc};

/// The DUT of the default MarsDB: vpdu's simulated DUT on outlet 1.
pub const ONE_DUT: &str = "52:54:00:11:22:01";

/// The default simulated kernel (a script of the simulated DUTs).
pub const SIM_KERNEL: &str = "#!vivian-sim\nprint [    1.000000] simulated kernel up\n";

/// The path of one of the `vivian` package's binaries (`salad`, `vpdu`,
/// `executor`, `executorctl`): Cargo's `CARGO_BIN_EXE_<name>` in that
/// package's tests, else the binary next to this test (other packages'
/// tests, built in the same target folder by `cargo test --workspace`).
pub fn bin(name: &str) -> PathBuf {
    let built = match name {
        "salad" => option_env!("CARGO_BIN_EXE_salad"),
        "vpdu" => option_env!("CARGO_BIN_EXE_vpdu"),
        "executor" => option_env!("CARGO_BIN_EXE_executor"),
        "executorctl" => option_env!("CARGO_BIN_EXE_executorctl"),
        _ => None,
    };
    if let Some(p) = built {
        return p.into();
    }
    let mut p = std::env::current_exe().unwrap();
    p.pop();
    if p.ends_with("deps") {
        p.pop();
    }
    let p = p.join(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace (cargo test --workspace builds it)",
        p.display()
    );
    p
}

/// How to start a [`RealFarm`]; made by [`RealFarm::builder`].
pub struct FarmBuilder {
    farm_name: String,
    outlets: u8,
    duts: Vec<String>,
    marsdb: Box<dyn Fn(SocketAddr) -> String>,
    kernel: String,
    initrd: String,
    env: Vec<(String, String)>,
    executor_url: bool,
}

/// The default MarsDB: the PDU `VPDU` and [`ONE_DUT`] on its outlet 1,
/// tag `sim`.
fn one_dut_marsdb(vpdu: SocketAddr) -> String {
    format!(
        "pdus:\n  VPDU:\n    driver: vpdu\n    config:\n      hostname: {vpdu}\nduts:\n  {ONE_DUT}:\n    base_name: sim\n    ip_address: 127.0.0.1\n    tags: [sim]\n    pdu: VPDU\n    pdu_port_id: '1'\n    pdu_off_delay: 0.1\n    ready_for_service: true\n"
    )
}

impl FarmBuilder {
    /// `vpdu` with `outlets` outlets, and the MarsDB `marsdb` makes from
    /// vpdu's address, whose DUTs are `duts` (the farm waits until each
    /// is IDLE). The default: 2 outlets and [`ONE_DUT`] on outlet 1.
    pub fn marsdb(
        mut self,
        outlets: u8,
        duts: Vec<String>,
        marsdb: impl Fn(SocketAddr) -> String + 'static,
    ) -> Self {
        self.outlets = outlets;
        self.duts = duts;
        self.marsdb = Box::new(marsdb);
        self
    }

    /// The artifacts served at `<artifacts>/kernel` and
    /// `<artifacts>/initrd` (default: [`SIM_KERNEL`] and `initrd`).
    pub fn artifacts(mut self, kernel: &str, initrd: &str) -> Self {
        self.kernel = kernel.into();
        self.initrd = initrd.into();
        self
    }

    /// Adds `key=value` to the executor's environment.
    pub fn env(mut self, key: &str, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Sets `EXECUTOR_URL` to the executor's own API URL.
    pub fn executor_url(mut self) -> Self {
        self.executor_url = true;
        self
    }

    /// Starts the farm and waits until every DUT is IDLE. The logs go to
    /// the farm's folder: `salad.log`, `vpdu.log`, `executor.log`.
    pub async fn start(self) -> RealFarm {
        let dir = tempfile::tempdir().unwrap();
        let files = dir.path().join("files");
        std::fs::create_dir(&files).unwrap();
        std::fs::write(files.join("kernel"), &self.kernel).unwrap();
        std::fs::write(files.join("initrd"), &self.initrd).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let files_addr = listener.local_addr().unwrap();
        let files_task = tokio::spawn(warp::serve(warp::fs::dir(files)).incoming(listener).run());

        let salad_port = free_port();
        let netconsole_port = free_port();
        let exec_port = free_port();
        let log = |name: &str| std::fs::File::create(dir.path().join(name)).unwrap();
        let salad = Proc(
            Command::new(bin("salad"))
                .env("SALAD_PORT", salad_port.to_string())
                .env("SALAD_TCPCONSOLE_PORT", netconsole_port.to_string())
                .env("SALAD_TCPCONSOLE_HOST", "127.0.0.1")
                .env("SALAD_MACHINE_HOST", "127.0.0.1")
                .env("SALAD_LOG_DIR", dir.path().join("consoles"))
                .env("SALAD_SERIAL_GLOBS", "")
                .stdout(Stdio::null())
                .stderr(log("salad.log"))
                .spawn()
                .expect("the salad binary starts"),
        );
        wait_for(
            &format!("http://127.0.0.1:{salad_port}/api/v1/machine"),
            "salad",
            |_| true,
        )
        .await;

        let api = format!("http://127.0.0.1:{exec_port}");
        let mut vpdu = Proc(
            Command::new(bin("vpdu"))
                .args(["--host", "127.0.0.1", "--port", "0"])
                .args(["--num-ports", &self.outlets.to_string()])
                .args(["--salad-console-port", &netconsole_port.to_string()])
                .args(["--executor-url", &api])
                .stdout(Stdio::piped())
                .stderr(log("vpdu.log"))
                .spawn()
                .expect("the vpdu binary starts"),
        );
        let stdout = vpdu.0.stdout.take().unwrap();
        let banner = tokio::task::spawn_blocking(move || {
            use std::io::BufRead;
            let mut line = String::new();
            std::io::BufReader::new(stdout)
                .read_line(&mut line)
                .unwrap();
            line
        })
        .await
        .unwrap();
        let vpdu_addr: SocketAddr = banner
            .split_whitespace()
            .nth(3)
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected vpdu banner {banner:?}"));

        let db = dir.path().join("mars_db.yaml");
        std::fs::write(&db, (self.marsdb)(vpdu_addr)).unwrap();
        let gitlab_conf = dir.path().join("gitlab-runner.toml");
        let mut exec_env: Vec<(String, String)> = [
            ("PATH", std::env::var("PATH").unwrap_or_default()),
            ("FARM_NAME", self.farm_name),
            ("MARS_DB_FILE", db.display().to_string()),
            ("EXECUTOR_HOST", "127.0.0.1".into()),
            ("EXECUTOR_PORT", exec_port.to_string()),
            ("SALAD_URL", format!("http://127.0.0.1:{salad_port}")),
            ("BOOTS_DISABLE_SERVERS", "1".into()),
            ("SERGENT_HARTMAN_QUICK_CHECK", "disabled".into()),
            ("GITLAB_CONF_FILE", gitlab_conf.display().to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        if self.executor_url {
            exec_env.push(("EXECUTOR_URL".into(), api.clone()));
        }
        exec_env.extend(self.env);
        let mut farm = RealFarm {
            api,
            artifacts: format!("http://{files_addr}"),
            duts: self.duts,
            exec_env,
            executor: None,
            _vpdu: vpdu,
            _salad: salad,
            files: files_task,
            dir,
        };
        farm.start_executor().await;
        for dut in &farm.duts {
            wait_for(
                &format!("{}/api/v1/dut/{dut}", farm.api),
                "the DUT becomes IDLE",
                |v| v["state"] == "IDLE",
            )
            .await;
        }
        farm
    }
}

/// A running farm of the real binaries (see the module's documentation).
pub struct RealFarm {
    /// The executor's API: `http://127.0.0.1:<port>`.
    pub api: String,
    /// The HTTP server of the artifacts (`/kernel`, `/initrd`).
    pub artifacts: String,
    /// The DUTs of the MarsDB.
    pub duts: Vec<String>,
    exec_env: Vec<(String, String)>,
    // Stopped in this order: the executor, vpdu, salad.
    executor: Option<Proc>,
    _vpdu: Proc,
    _salad: Proc,
    files: tokio::task::JoinHandle<()>,
    /// The farm's folder: MarsDB, `job_logs`, `consoles`, the logs.
    pub dir: tempfile::TempDir,
}

impl RealFarm {
    /// A farm named `farm_name` (`FARM_NAME`), with the defaults of
    /// [`FarmBuilder`].
    pub fn builder(farm_name: &str) -> FarmBuilder {
        FarmBuilder {
            farm_name: farm_name.into(),
            outlets: 2,
            duts: vec![ONE_DUT.into()],
            marsdb: Box::new(one_dut_marsdb),
            kernel: SIM_KERNEL.into(),
            initrd: "initrd".into(),
            env: vec![],
            executor_url: false,
        }
    }

    /// `p` in the farm's folder.
    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// Writes the job `name` in the farm's folder: `head` (target,
    /// timeouts, console patterns), then a deployment that boots the
    /// farm's artifacts with a command line running `cmds`
    /// (simulated-DUT script commands).
    pub fn write_sim_job(&self, name: &str, head: &str, cmds: &[&str]) -> PathBuf {
        let mut cmdline = String::from("        - \"SALAD.machine_id={{ machine_id }}\"\n");
        for c in cmds {
            cmdline.push_str(&format!("        - 'vivian.cmd=\"{c}\"'\n"));
        }
        let text = format!(
            r#"version: 1
{head}
deployment:
  start:
    kernel:
      url: "{a}/kernel"
      cmdline:
{cmdline}    initramfs:
      url: "{a}/initrd"
"#,
            a = self.artifacts
        );
        let p = self.path(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// Starts the executor (its output appended to `executor.log`) and
    /// waits until its API answers for every DUT.
    pub async fn start_executor(&mut self) {
        assert!(self.executor.is_none(), "the executor is running already");
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.path("executor.log"))
            .unwrap();
        let child = Command::new(bin("executor"))
            .env_clear()
            .envs(self.exec_env.iter().map(|(k, v)| (k, v)))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("the executor binary starts");
        self.executor = Some(Proc(child));
        for dut in &self.duts {
            wait_for(
                &format!("{}/api/v1/dut/{dut}", self.api),
                "the executor's API",
                |v| v["state"].is_string(),
            )
            .await;
        }
    }

    /// SIGKILLs the executor.
    pub fn kill_executor(&mut self) {
        let mut p = self.executor.take().expect("a running executor");
        p.0.kill().unwrap();
        p.0.wait().unwrap();
    }
}

impl Drop for RealFarm {
    fn drop(&mut self) {
        self.executor.take();
        self.files.abort();
    }
}
