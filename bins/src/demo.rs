//! A self-contained virtual farm on localhost (`executor demo`).
//!
//! Everything runs in one process, without root: the REST API on
//! 127.0.0.1, the in-process console multiplexer (the same code as the
//! `salad` binary), a virtual PDU (the same server as the `vpdu` binary)
//! whose outlets power simulated DUTs ([`crate::simdut`]), a MarsDB file in
//! a temporary folder listing those DUTs as ready for service, and the job
//! engine. The simulated DUTs boot from the executor's own `boot.ipxe` and
//! fetch their "kernel" and "initrd" from `/demo/artifacts/` on the same
//! HTTP server.
//!
//! With [`DemoOptions::dhcp`], the farm also runs Vivian's DHCP server
//! (on loopback, bound to `lo`) and the simulated DUTs ask it for their
//! address and boot file before booting, as netbooting PCs do; their DHCP
//! client listens on port 68, so this needs root.
//!
//! Tests use [`DemoFarm`] as a whole farm in a box.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use tokio::sync::watch;
use warp::Filter;

use vivian_core::console::ConsoleSource;
use vivian_core::farm::{Farm, FarmOptions};
use vivian_core::marsdb::{FileMarsDb, FileOptions, MarsDb, Validator};
use vivian_core::pdu::{PduManager, PduOptions};
use vivian_salad::{InProcessConsoles, Salad, SaladConfig};

use crate::engine::{EngineOptions, JobEngine};
use crate::simdut::{sim_duts_with_dhcp, SimDhcpConfig};
use crate::vpdu::{DutFactory, OutletDut, OutletInfo, VpduConfig, VpduServer, VpduServerHandle};
use vivian_core::netboot::BootEvent;

/// The simulated kernel every demo DUT boots: a script (see
/// [`crate::simdut`]) printing kernel-like lines.
pub const DEMO_KERNEL: &str = "#!vivian-sim\n\
print [    0.200000] vivian-sim: simulated kernel booted\n\
print [    0.300000] vivian-sim: mounting the simulated rootfs\n";

/// The sample job `executor demo` runs (a Jinja2 template, as jobs are).
pub const SAMPLE_JOB: &str = r#"# A sample Vivian job for the simulated DUTs of `executor demo`.
version: 1
target:
  tags: ["sim"]
timeouts:
  overall: {minutes: 2}
  first_console_activity: {seconds: 30, retries: 1}
  console_activity: {seconds: 20}
console_patterns:
  session_end: {regex: "reboot: Power down"}
  job_success: {regex: "^JOB_RESULT=PASS"}
deployment:
  start:
    kernel:
      url: "@ARTIFACTS@/kernel"
      cmdline:
        - "SALAD.machine_id={{ machine_id }}"
        - 'vivian.cmd="print Hello from {{ machine.full_name }}, running the sample job"'
        - 'vivian.cmd="sleep 0.5"'
        - 'vivian.cmd="print JOB_RESULT=PASS"'
        - "vivian.cmd=poweroff"
    initramfs:
      url: "@ARTIFACTS@/initrd"
"#;

/// Options of a [`DemoFarm`].
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Farm name (`FARM_NAME`).
    pub farm_name: String,
    /// Port of the REST API on 127.0.0.1 (0: any free port).
    pub api_port: u16,
    /// Port of the virtual PDU on 127.0.0.1 (0: any free port).
    pub vpdu_port: u16,
    /// Number of simulated DUTs (1 to 255).
    pub duts: u8,
    /// Folder for MarsDB, logs and artifacts (None: a temporary folder,
    /// removed when the farm stops).
    pub dir: Option<PathBuf>,
    /// Run Vivian's DHCP server on loopback and make the simulated DUTs
    /// ask it for their address and boot file (needs root: the DUTs' DHCP
    /// client listens on port 68).
    pub dhcp: bool,
    /// `EXECUTOR_JOB__*` variables (lower-case names without the prefix)
    /// of the job templates, at submission and in the job engine.
    pub job_env: std::collections::BTreeMap<String, String>,
    /// Called on every outlet switch of the virtual PDU, before the DUT
    /// reacts (benchmarks time the power-on command with it).
    pub power_hook: Option<PowerHook>,
    /// Object storage for job buckets (none: jobs run without a bucket).
    pub job_buckets: Option<Arc<crate::job_bucket::JobBuckets>>,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            farm_name: "demo".into(),
            api_port: 0,
            vpdu_port: 0,
            duts: 4,
            dir: None,
            dhcp: false,
            job_env: Default::default(),
            power_hook: None,
            job_buckets: None,
        }
    }
}

/// A callback of the virtual PDU: `(outlet index, switched ON)`.
#[derive(Clone)]
pub struct PowerHook(pub Arc<dyn Fn(u16, bool) + Send + Sync>);

impl std::fmt::Debug for PowerHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PowerHook")
    }
}

/// A DUT whose power switches are reported to a [`PowerHook`] first.
struct HookedDut {
    index: u16,
    hook: PowerHook,
    inner: Box<dyn OutletDut>,
}

#[async_trait::async_trait]
impl OutletDut for HookedDut {
    async fn power_on(&mut self) -> Result<(), String> {
        (self.hook.0)(self.index, true);
        self.inner.power_on().await
    }

    async fn power_off(&mut self) {
        (self.hook.0)(self.index, false);
        self.inner.power_off().await
    }
}

/// The loopback address of the demo DUT on outlet `index`
/// (`127.1.<index / 250>.<index % 250 + 1>`), its static address in MarsDB.
pub fn demo_dut_ip(index: u16) -> Ipv4Addr {
    Ipv4Addr::new(127, 1, (index / 250) as u8, (index % 250 + 1) as u8)
}

/// A running virtual farm.
pub struct DemoFarm {
    /// Base URL of the REST API, `http://127.0.0.1:<port>`.
    pub api_url: String,
    /// Address of the virtual PDU.
    pub vpdu_addr: SocketAddr,
    /// Address of the console multiplexer's netconsole.
    pub netconsole_addr: SocketAddr,
    /// The folder holding MarsDB, logs and artifacts.
    pub dir: PathBuf,
    /// The farm (runtime state, MarsDB, PDUs).
    pub farm: Arc<Farm>,
    /// The DHCP server's address, with [`DemoOptions::dhcp`].
    pub dhcp_addr: Option<SocketAddr>,
    boots: Option<vivian_boots::Boots>,
    boot_events: Arc<Mutex<Vec<BootEvent>>>,
    salad: Salad,
    vpdu: VpduServerHandle,
    stop: watch::Sender<bool>,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
    _tmp: Option<tempfile::TempDir>,
}

/// The MarsDB of the demo: one `vpdu` PDU and `duts` ready DUTs on its
/// outlets, tagged `sim` and `sim:outlet<n>`.
pub fn demo_marsdb(vpdu: SocketAddr, duts: u8) -> String {
    let mut y = format!(
        "pdus:\n  VPDU:\n    driver: vpdu\n    config:\n      hostname: {vpdu}\n    reserved_port_ids: []\nduts:\n"
    );
    for i in 0..u16::from(duts) {
        let mac = crate::vpdu::outlet_mac(i);
        let ip = demo_dut_ip(i);
        y.push_str(&format!(
            "  {mac}:\n    base_name: sim\n    ip_address: {ip}\n    tags:\n    - sim\n    - sim:outlet{i}\n    manual_tags: []\n    local_tty_device: ttyS0\n    pdu: VPDU\n    pdu_port_id: '{i}'\n    pdu_off_delay: 0.1\n    ready_for_service: true\n    is_retired: false\n    comment: simulated DUT on outlet {i}\n"
        ));
    }
    y.push_str("gitlab: {}\n");
    y
}

impl DemoFarm {
    /// Starts the farm. Everything listens on 127.0.0.1.
    pub async fn start(opts: DemoOptions) -> anyhow::Result<DemoFarm> {
        anyhow::ensure!(opts.duts > 0, "the demo needs at least one DUT");
        let (tmp, dir) = match &opts.dir {
            Some(d) => (None, d.clone()),
            None => {
                let t = tempfile::Builder::new()
                    .prefix("vivian-demo-")
                    .tempdir()
                    .context("cannot create a temporary folder")?;
                let p = t.path().to_path_buf();
                (Some(t), p)
            }
        };
        let artifacts = dir.join("artifacts");
        std::fs::create_dir_all(&artifacts)
            .with_context(|| format!("cannot create {}", artifacts.display()))?;
        std::fs::write(artifacts.join("kernel"), DEMO_KERNEL)?;
        std::fs::write(artifacts.join("initrd"), "simulated initramfs\n")?;

        // Consoles.
        let salad = Salad::start(SaladConfig::local(Some(dir.join("consoles"))))
            .await
            .context("cannot start the console multiplexer")?;
        let netconsole_addr = salad
            .netconsole_addr()
            .context("the console multiplexer has no netconsole")?;

        // The API listener first: the DUTs need its URL.
        let listener = std::net::TcpListener::bind(("127.0.0.1", opts.api_port)).map_err(|e| {
            let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
                " (another program uses it: `executor demo --port 0` takes any free port)"
            } else {
                ""
            };
            anyhow::Error::new(e).context(format!(
                "cannot listen on 127.0.0.1:{} for the REST API{hint}",
                opts.api_port
            ))
        })?;
        let api_addr = listener.local_addr()?;
        let api_url = format!("http://{api_addr}");

        // DHCP on loopback: a socket bound to `lo`, so that its broadcast
        // replies stay on loopback.
        let dhcp_socket = if opts.dhcp {
            let s = vivian_boots::iface::bind_udp(
                SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
                Some("lo"),
                true,
            )
            .map_err(|e| anyhow::anyhow!("the demo's DHCP server (needs root): {e}"))?;
            Some(s)
        } else {
            None
        };
        let dhcp_addr = dhcp_socket.as_ref().and_then(|s| s.local_addr().ok());

        // The virtual PDU and its simulated DUTs.
        let sims = sim_duts_with_dhcp(
            api_url.clone(),
            "127.0.0.1".into(),
            dhcp_addr.map(SimDhcpConfig::new),
        );
        let factory: Box<dyn DutFactory> = match opts.power_hook.clone() {
            None => Box::new(sims),
            Some(hook) => Box::new(move |o: &OutletInfo| {
                Box::new(HookedDut {
                    index: o.index,
                    hook: hook.clone(),
                    inner: sims.create(o),
                }) as Box<dyn OutletDut>
            }),
        };
        let vpdu = VpduServer::bind(
            ("127.0.0.1", opts.vpdu_port),
            VpduConfig {
                num_ports: opts.duts,
                salad_console_port: Some(netconsole_addr.port()),
            },
            move |o: &OutletInfo| factory.create(o),
        )
        .await
        .with_context(|| format!("cannot listen on 127.0.0.1:{}", opts.vpdu_port))?;
        let vpdu_addr = vpdu.local_addr()?;
        let vpdu = vpdu.spawn();

        // MarsDB.
        let db_path = dir.join("mars_db.yaml");
        if !db_path.exists() {
            let tmp_path = dir.join(".mars_db.yaml.tmp");
            std::fs::write(&tmp_path, demo_marsdb(vpdu_addr, opts.duts))
                .and_then(|_| std::fs::rename(&tmp_path, &db_path))
                .with_context(|| format!("cannot write {}", db_path.display()))?;
        }
        let registry = Arc::new(vivian_pdu::default_registry());
        let validator: Validator = registry.marsdb_validator();
        let db = FileMarsDb::open(
            &db_path,
            FileOptions {
                validator: Some(validator),
                ..FileOptions::default()
            },
        )
        .await
        .with_context(|| format!("cannot open {}", db_path.display()))?;
        if let Some(e) = db.error() {
            anyhow::bail!("the demo's MarsDB is invalid: {e}");
        }
        let db: Arc<dyn MarsDb> = Arc::new(db);

        let boot_events = Arc::new(Mutex::new(Vec::new()));
        let boots = match dhcp_socket {
            None => None,
            Some(sock) => {
                let events = boot_events.clone();
                let mut cfg = vivian_boots::BootsConfig::new("lo", dir.join("tftp"), &api_url);
                cfg.dhcp_bind = dhcp_addr.unwrap_or(cfg.dhcp_bind);
                let boots = vivian_boots::Boots::start_with(
                    &cfg,
                    vivian_boots::SocketSource::Given(sock),
                    vivian_boots::SocketSource::Disabled,
                    vivian_boots::NetworkSource::Fixed(vivian_boots::Subnet {
                        server_ip: Ipv4Addr::LOCALHOST,
                        netmask: Ipv4Addr::new(255, 0, 0, 0),
                    }),
                    Arc::new(vivian_core::netboot::MarsDbDuts::new(db.clone())),
                    Arc::new(move |e: BootEvent| {
                        events.lock().unwrap_or_else(|p| p.into_inner()).push(e)
                    }),
                )
                .map_err(|e| anyhow::anyhow!("the demo's DHCP server: {e}"))?;
                Some(boots)
            }
        };

        // The farm and its job engine.
        let pdus = Arc::new(PduManager::new(registry, PduOptions::default()));
        let mut farm_opts = FarmOptions::new(opts.farm_name.clone());
        farm_opts.quick_check_enabled = false;
        let farm = Farm::new(db, pdus, farm_opts);
        farm.start().await;
        let console: Arc<dyn ConsoleSource> = Arc::new(InProcessConsoles::new(salad.clone()));
        let minio_url = match &opts.job_buckets {
            Some(b) => b.storage().url().as_str().trim_end_matches('/').to_string(),
            None => "http://127.0.0.1:9000".into(),
        };
        farm.set_job_runner(Arc::new(
            JobEngine::new(
                console,
                EngineOptions {
                    minio_url,
                    job_env: opts.job_env.clone(),
                    parse: Default::default(),
                    log_dir: dir.join("jobs"),
                    artifacts: None,
                },
            )
            .with_job_buckets(opts.job_buckets.clone()),
        ));

        // The REST API, plus the artifacts.
        let mut env = std::collections::BTreeMap::new();
        env.insert("FARM_NAME".to_string(), opts.farm_name.clone());
        env.insert(
            "BOOTS_DEFAULT_KERNEL".to_string(),
            format!("{api_url}/demo/artifacts/kernel"),
        );
        env.insert(
            "BOOTS_DEFAULT_INITRD".to_string(),
            format!("{api_url}/demo/artifacts/initrd"),
        );
        env.insert(
            "BOOTS_DEFAULT_CMDLINE".to_string(),
            "vivian.cmd=\"print no job for this machine\"".to_string(),
        );
        let config = vivian_core::config::Config::from_env_map(&env)
            .map_err(|e| anyhow::anyhow!("demo configuration: {e}"))?;
        let netboot = Arc::new(vivian_core::netboot::DefaultNetboot::new(
            config.boots_defaults.clone(),
            farm.clone(),
        ));
        let state = crate::api::ApiState::with_options(
            farm.clone(),
            crate::api::ApiOptions {
                netboot: Some(netboot),
                minio_url: config.minio_url.as_str().to_string(),
                job_env: opts.job_env.clone(),
            },
        );
        let files = warp::path!("demo" / "artifacts" / ..)
            .and(warp::fs::dir(artifacts))
            .map(warp::Reply::into_response);
        let filter = crate::serve::with_request_log(crate::serve::with_json_fallback(
            files.or(crate::api::routes(state)).unify(),
        ));
        // Ready when every DUT is IDLE (the PDU answered and its ports
        // resolved), so a job submitted right away finds a DUT.
        let ids: Vec<_> = farm.db().snapshot().duts.keys().copied().collect();
        let mut changes = farm.subscribe();
        let all_idle = || {
            ids.iter()
                .all(|id| farm.dut_state(id) == Some(vivian_core::state::DutState::Idle))
        };
        let ready = tokio::time::timeout(std::time::Duration::from_secs(30), async {
            while !all_idle() {
                if changes.changed().await.is_err() {
                    break;
                }
            }
        })
        .await;
        anyhow::ensure!(
            ready.is_ok() && all_idle(),
            "the demo DUTs did not become IDLE within 30 s (is the virtual PDU reachable?)"
        );

        let (stop, mut stop_rx) = watch::channel(false);
        let server = tokio::spawn(crate::serve::serve(filter, vec![listener], async move {
            let _ = stop_rx.wait_for(|s| *s).await;
        }));

        Ok(DemoFarm {
            api_url,
            vpdu_addr,
            netconsole_addr,
            dir,
            farm,
            dhcp_addr,
            boots,
            boot_events,
            salad,
            vpdu,
            stop,
            server,
            _tmp: tmp,
        })
    }

    /// Base URL of the demo's artifacts (the simulated kernel and initrd).
    pub fn artifacts_url(&self) -> String {
        format!("{}/demo/artifacts", self.api_url)
    }

    /// Writes the sample job into the farm's folder ([`SAMPLE_JOB`] with
    /// `@ARTIFACTS@` replaced by [`DemoFarm::artifacts_url`]); returns its path.
    pub fn write_sample_job(&self) -> anyhow::Result<PathBuf> {
        let p = self.dir.join("sample-job.yml.j2");
        std::fs::write(&p, SAMPLE_JOB.replace("@ARTIFACTS@", &self.artifacts_url()))
            .with_context(|| format!("cannot write {}", p.display()))?;
        Ok(p)
    }

    /// The folder of the job logs.
    pub fn job_log_dir(&self) -> PathBuf {
        self.dir.join("jobs")
    }

    /// The DHCP server's events so far (empty without [`DemoOptions::dhcp`]).
    pub fn boot_events(&self) -> Vec<BootEvent> {
        self.boot_events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Stops everything it started: the API (in-flight requests finish),
    /// the farm and its PDUs, the virtual PDU (its DUTs are powered off)
    /// and the consoles.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.server.await;
        self.farm.shutdown().await;
        self.vpdu.stop().await;
        if let Some(b) = self.boots {
            b.shutdown();
        }
        self.salad.shutdown().await;
    }
}

/// Command-line options of `executor demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Port of the REST API on 127.0.0.1.
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Port of the virtual PDU on 127.0.0.1 (0: any free port).
    #[arg(long, default_value_t = 0)]
    pub vpdu_port: u16,
    /// Number of simulated DUTs.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u8).range(1..))]
    pub duts: u8,
    /// Folder for MarsDB, logs and artifacts (default: a temporary folder,
    /// removed on exit). An existing MarsDB there is reused.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Run this job instead of the sample job.
    #[arg(long)]
    pub job: Option<PathBuf>,
    /// Stop after the job instead of leaving the farm running; the exit
    /// status is then the job's (as executorctl's).
    #[arg(long)]
    pub once: bool,
    /// Also run the DHCP server on loopback: the simulated DUTs get their
    /// address and boot file from it (needs root).
    #[arg(long)]
    pub dhcp: bool,
}

/// Runs `executor demo`: starts the farm, runs the sample job with its
/// console streamed to the terminal, then leaves the farm running until
/// Ctrl-C (or stops at once with `--once`). Returns the process exit code.
pub async fn run_demo(args: DemoArgs) -> anyhow::Result<u8> {
    let farm = DemoFarm::start(DemoOptions {
        farm_name: "demo".into(),
        api_port: args.port,
        vpdu_port: args.vpdu_port,
        duts: args.duts,
        dir: args.dir.clone(),
        dhcp: args.dhcp,
        ..DemoOptions::default()
    })
    .await?;
    let job = match &args.job {
        Some(j) => j.clone(),
        None => farm.write_sample_job()?,
    };
    eprintln!(
        "Vivian demo farm: REST API on {}, virtual PDU on {}, {} simulated DUTs, files in {}",
        farm.api_url,
        farm.vpdu_addr,
        args.duts,
        farm.dir.display()
    );
    eprintln!("Running the job {} ...\n", job.display());
    let mut opts = crate::client::RunOptions::new(farm.api_url.clone(), job);
    opts.interactive = false;
    let status = crate::client::run_job(&opts).await;
    eprintln!("\nThe job ended with status {status}.");
    if args.once {
        farm.stop().await;
        return Ok(status.exit_code() as u8);
    }
    let url = &farm.api_url;
    eprintln!(
        "\nThe farm keeps running. Try:\n  \
         curl {url}/api/v1/duts\n  \
         curl {url}/api/v1/full-state\n  \
         cargo run --bin executorctl -- -e {url} duts\n  \
         cargo run --bin executorctl -- -e {url} run {}\n  \
         # job logs: {}\n\
         Press Ctrl-C to stop.",
        farm.dir.join("sample-job.yml.j2").display(),
        farm.job_log_dir().display()
    );
    crate::serve::shutdown_signal().await;
    eprintln!("Stopping the demo farm...");
    farm.stop().await;
    Ok(status.exit_code() as u8)
}
