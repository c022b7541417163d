//! Qualification end to end (Sergent Hartman): discovery, registration,
//! training boot loops and quick checks on simulated DUTs that netboot from
//! the executor, through a real virtual PDU, the console multiplexer, the
//! job engine and the REST API, with MarsDB in a file that the tests also
//! edit by hand.
//!
//! The shipped job templates (`examples/jobs/registration.yml.j2` and
//! `bootloop.yml.j2`, variant `training_dut=sim`) drive the DUTs; tests that
//! need a misbehaving machine use copies of them with one command changed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::watch;
use warp::Filter;

use vivian::client::{run_job, RunOptions};
use vivian::engine::{EngineOptions, JobEngine, BOOTLOOP_JOB, REGISTRATION_JOB};
use vivian::simdut::sim_duts;
use vivian::vpdu::{outlet_mac, VpduConfig, VpduServer, VpduServerHandle};
use vivian_core::console::ConsoleSource;
use vivian_core::farm::{Farm, FarmOptions, JobTemplate, TrainingOptions};
use vivian_core::job::JobStatus;
use vivian_core::marsdb::{FileMarsDb, FileOptions, MarsDb};
use vivian_core::pdu::{PduManager, PduOptions};
use vivian_salad::{InProcessConsoles, Salad, SaladConfig};

/// The simulated kernel: a script that prints a line.
const KERNEL: &str = "#!vivian-sim\nprint [    0.200000] vivian-sim: simulated kernel booted\n";

/// What an unknown machine boots (`BOOTS_DEFAULT_CMDLINE`): it registers
/// itself, as the reference's registration container does.
const DEFAULT_CMDLINE: &str = "vivian.cmd=\"post @EXECUTOR@/api/v1/dut/ mac_address=@MAC@ base_name=sim ip_address=@IP@ tags[]=sim local_tty_device=ttyS0\" vivian.cmd=\"print MaRS: Registration complete\" vivian.cmd=poweroff";

struct Options {
    outlets: u8,
    /// MarsDB (`@VPDU@` is replaced by the virtual PDU's address).
    marsdb: String,
    boot_count: i64,
    qualifying: u32,
    retrial_delay: Duration,
    /// Registration and boot-loop templates (written to files the farm
    /// reads at every job).
    registration: String,
    bootloop: String,
    /// `SERGENT_HARTMAN_QUICK_CHECK`.
    quick_check: bool,
    /// `SERGENT_HARTMAN_QUIET`.
    quiet: bool,
    /// Bytes every console attachment yields first, as if the DUT had
    /// printed them just before the job powered it on (see
    /// [`StaleConsoles`]).
    stale_console: Option<&'static [u8]>,
    /// Every quick check stops before its check until the test releases
    /// it ([`QualFarm::held`], [`QualFarm::release`]), so that the state a
    /// DUT shows during its quick check is observed whatever the speed of
    /// the machine (a simulated check takes a few milliseconds).
    hold_quick_checks: bool,
}

impl Options {
    fn new(marsdb: &str) -> Self {
        Options {
            outlets: 3,
            marsdb: marsdb.to_string(),
            boot_count: 2,
            qualifying: 2,
            retrial_delay: Duration::from_secs(1),
            registration: REGISTRATION_JOB.to_string(),
            bootloop: BOOTLOOP_JOB.to_string(),
            quick_check: true,
            quiet: false,
            stale_console: None,
            hold_quick_checks: false,
        }
    }
}

/// A farm with Sergent Hartman on 127.0.0.1.
struct QualFarm {
    api: String,
    dir: tempfile::TempDir,
    farm: Arc<Farm>,
    http: reqwest::Client,
    salad: Salad,
    vpdu: VpduServerHandle,
    stop: watch::Sender<bool>,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
    holds: Arc<Holds>,
}

/// The quick checks held by [`Options::hold_quick_checks`]: the simulated
/// DUT's `GET /hold/<MAC>` waits here until the test releases that DUT.
#[derive(Default)]
struct Holds {
    enabled: bool,
    waiting: std::sync::Mutex<std::collections::HashMap<String, tokio::sync::oneshot::Sender<()>>>,
}

impl Holds {
    /// Writes the bootloop template to `path`, with a held request before
    /// the check of a quick check when holding. The request's answer
    /// (204) matches no pattern.
    fn write_bootloop(&self, path: &Path, bootloop: &str) {
        if !self.enabled {
            std::fs::write(path, bootloop).unwrap();
            return;
        }
        const CHECK: &str = "\n          - 'vivian.cmd=\"get @EXECUTOR@/api/v1/dut/@MAC@";
        let held = bootloop.replace(
            CHECK,
            &format!(
                "\n{{%- if training_kind == 'quick_check' %}}\n          - 'vivian.cmd=\"get @EXECUTOR@/hold/@MAC@\"'\n{{%- endif %}}{CHECK}"
            ),
        );
        assert_ne!(held, bootloop, "the bootloop template has no check to hold");
        std::fs::write(path, held).unwrap();
    }

    /// The route the held DUTs call.
    fn route(
        self: &Arc<Self>,
    ) -> impl Filter<Extract = (warp::reply::Response,), Error = warp::Rejection> + Clone {
        let holds = self.clone();
        warp::path!("hold" / String).and_then(move |mac: String| {
            let (tx, rx) = tokio::sync::oneshot::channel();
            holds.waiting.lock().unwrap().insert(mac, tx);
            async move {
                // Released, or the farm stopped (the sender was dropped).
                let _ = rx.await;
                Ok::<_, warp::Rejection>(warp::Reply::into_response(warp::reply::with_status(
                    "",
                    warp::http::StatusCode::NO_CONTENT,
                )))
            }
        })
    }
}

impl QualFarm {
    async fn start(opts: Options) -> QualFarm {
        let dir = tempfile::tempdir().unwrap();
        let artifacts = dir.path().join("artifacts");
        std::fs::create_dir_all(&artifacts).unwrap();
        std::fs::write(artifacts.join("kernel"), KERNEL).unwrap();
        std::fs::write(artifacts.join("initrd"), "simulated initramfs\n").unwrap();
        let registration = dir.path().join("registration.yml.j2");
        let bootloop = dir.path().join("bootloop.yml.j2");
        std::fs::write(&registration, &opts.registration).unwrap();
        let holds = Arc::new(Holds {
            enabled: opts.hold_quick_checks,
            ..Holds::default()
        });
        holds.write_bootloop(&bootloop, &opts.bootloop);

        let salad = Salad::start(SaladConfig::local(Some(dir.path().join("consoles"))))
            .await
            .unwrap();
        let netconsole = salad.netconsole_addr().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let api = format!("http://{}", listener.local_addr().unwrap());
        let vpdu = VpduServer::bind(
            "127.0.0.1:0",
            VpduConfig {
                num_ports: opts.outlets,
                salad_console_port: Some(netconsole.port()),
            },
            sim_duts(api.clone(), "127.0.0.1".into()),
        )
        .await
        .unwrap();
        let vpdu_addr = vpdu.local_addr().unwrap();
        let vpdu = vpdu.spawn();

        let db_path = dir.path().join("mars_db.yaml");
        std::fs::write(
            &db_path,
            opts.marsdb.replace("@VPDU@", &vpdu_addr.to_string()),
        )
        .unwrap();
        let registry = Arc::new(vivian_pdu::default_registry());
        let db = FileMarsDb::open(
            &db_path,
            FileOptions {
                validator: Some(registry.marsdb_validator()),
                ..FileOptions::default()
            },
        )
        .await
        .unwrap();
        assert!(db.error().is_none(), "{:?}", db.error());
        let db: Arc<dyn MarsDb> = Arc::new(db);
        let pdus = Arc::new(PduManager::new(
            registry,
            PduOptions {
                poll_interval: Duration::from_millis(200),
                ..PduOptions::default()
            },
        ));
        let mut training =
            TrainingOptions::new(JobTemplate::File(registration), JobTemplate::File(bootloop));
        training.boot_count = opts.boot_count;
        training.qualifying_boot_count = opts.qualifying;
        training.registration_retrial_delay = opts.retrial_delay;
        training.quick_check = opts.quick_check;
        training.quiet = opts.quiet;
        let mut farm_opts = FarmOptions::new("qual");
        // As the executor does (`Config::quick_check_enabled`).
        farm_opts.quick_check_enabled = opts.quick_check && opts.boot_count >= 0;
        farm_opts.training = Some(training);
        let farm = Farm::new(db, pdus, farm_opts);
        let mut console: Arc<dyn ConsoleSource> = Arc::new(InProcessConsoles::new(salad.clone()));
        if let Some(stale) = opts.stale_console {
            console = Arc::new(StaleConsoles {
                inner: console,
                stale,
            });
        }
        let job_env = [
            ("training_dut", "sim".to_string()),
            ("training_kernel_url", format!("{api}/artifacts/kernel")),
            ("training_initramfs_url", format!("{api}/artifacts/initrd")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let engine = EngineOptions {
            minio_url: "http://127.0.0.1:9".into(),
            job_env,
            log_dir: dir.path().join("jobs"),
            ..EngineOptions::default()
        };
        farm.set_job_runner(Arc::new(JobEngine::new(console, engine)));
        farm.start().await;
        // Ready when the virtual PDU has listed its outlets.
        let h = farm.pdus().get("VPDU").expect("the VPDU PDU exists");
        let mut listed = false;
        for _ in 0..500 {
            if h.snapshot().ports.len() == usize::from(opts.outlets) {
                listed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(listed, "the virtual PDU never listed its outlets");

        let env = [
            ("FARM_NAME", "qual".to_string()),
            ("BOOTS_DEFAULT_KERNEL", format!("{api}/artifacts/kernel")),
            ("BOOTS_DEFAULT_INITRD", format!("{api}/artifacts/initrd")),
            ("BOOTS_DEFAULT_CMDLINE", DEFAULT_CMDLINE.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let config = vivian_core::config::Config::from_env_map(&env).unwrap();
        let netboot = Arc::new(vivian_core::netboot::DefaultNetboot::new(
            config.boots_defaults.clone(),
            farm.clone(),
        ));
        let state = vivian::api::ApiState::with_options(
            farm.clone(),
            vivian::api::ApiOptions {
                netboot: Some(netboot),
                ..vivian::api::ApiOptions::default()
            },
        );
        let files = warp::path!("artifacts" / ..)
            .and(warp::fs::dir(artifacts))
            .map(warp::Reply::into_response);
        let filter = vivian::serve::with_json_fallback(
            files
                .or(holds.route())
                .unify()
                .or(vivian::api::routes(state))
                .unify(),
        );
        let (stop, mut stop_rx) = watch::channel(false);
        let server = tokio::spawn(vivian::serve::serve(filter, vec![listener], async move {
            let _ = stop_rx.wait_for(|s| *s).await;
        }));
        QualFarm {
            api,
            dir,
            farm,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
            salad,
            vpdu,
            stop,
            server,
            holds,
        }
    }

    async fn stop(self) {
        // Held quick checks go on (and the server can drain).
        self.holds.waiting.lock().unwrap().clear();
        let _ = self.stop.send(true);
        let _ = self.server.await;
        self.farm.shutdown().await;
        self.vpdu.stop().await;
        self.salad.shutdown().await;
    }

    fn db_path(&self) -> PathBuf {
        self.dir.path().join("mars_db.yaml")
    }

    /// Replaces the boot-loop template the farm reads at every job (with
    /// the hold of [`Options::hold_quick_checks`] when the farm holds).
    fn set_bootloop(&self, text: &str) {
        self.holds
            .write_bootloop(&self.dir.path().join("bootloop.yml.j2"), text);
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let r = self
            .http
            .get(format!("{}{path}", self.api))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    async fn send(&self, method: &str, path: &str, body: Option<Value>) -> (u16, String) {
        let mut req = self
            .http
            .request(method.parse().unwrap(), format!("{}{path}", self.api));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    async fn dut(&self, id: &str) -> Value {
        let (status, body) = self.get(&format!("/api/v1/dut/{id}")).await;
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// Waits (at most 30 s) until the quick check of `id` is held
    /// ([`Options::hold_quick_checks`]), then returns the DUT object read
    /// after that: the check cannot have ended.
    async fn held(&self, id: &str) -> Value {
        self.wait(id, "quick check held", 30, |_| {
            self.holds.waiting.lock().unwrap().contains_key(id)
        })
        .await;
        self.dut(id).await
    }

    /// Lets the held quick check of `id` go on.
    fn release(&self, id: &str) {
        let tx = self.holds.waiting.lock().unwrap().remove(id);
        let tx = tx.unwrap_or_else(|| panic!("{id}: no quick check is held"));
        let _ = tx.send(());
    }

    /// Polls the DUT (every 20 ms, at most `secs`) until `cond` holds;
    /// returns the DUT object and every state seen on the way.
    async fn wait(
        &self,
        id: &str,
        what: &str,
        secs: u64,
        mut cond: impl FnMut(&Value) -> bool,
    ) -> (Value, Vec<String>) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut seen: Vec<String> = Vec::new();
        loop {
            let d = self.dut(id).await;
            let state = d["state"].as_str().unwrap_or("?").to_string();
            if seen.last() != Some(&state) {
                seen.push(state);
            }
            if cond(&d) {
                return (d, seen);
            }
            assert!(
                Instant::now() < deadline,
                "{id}: {what} not reached in {secs} s; states seen {seen:?}; now {d}\njob logs:\n{}",
                self.dump_logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The end of every job log, for failure messages.
    fn dump_logs(&self) -> String {
        let mut out = String::new();
        if let Ok(rd) = std::fs::read_dir(self.dir.path().join("jobs")) {
            for e in rd.flatten() {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                let start = text.len().saturating_sub(1500);
                let start = (start..text.len())
                    .find(|i| text.is_char_boundary(*i))
                    .unwrap_or(text.len());
                out.push_str(&format!(
                    "--- {}\n{}\n",
                    e.file_name().to_string_lossy(),
                    &text[start..]
                ));
            }
        }
        out
    }

    /// The job log files of `kind` (`registration`, `bootloop`,
    /// `quick_check`) for DUT `mac`, oldest first (job ids end with their
    /// start time).
    fn logs(&self, kind: &str, mac: &str) -> Vec<String> {
        let prefix = format!("{kind}-{}-", mac.replace(':', ""));
        let mut names = Vec::new();
        if let Ok(rd) = std::fs::read_dir(self.dir.path().join("jobs")) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(&prefix) {
                    names.push((name, e.path()));
                }
            }
        }
        names.sort();
        names
            .into_iter()
            .map(|(_, p)| std::fs::read_to_string(p).unwrap_or_default())
            .collect()
    }

    /// Runs a user job on `id` with executorctl's client code.
    async fn user_job(&self, id: &str) -> JobStatus {
        self.user_job_printing(id, "JOB_RESULT=PASS").await
    }

    /// Runs a user job on `id` whose DUT prints `line` (PASS when it is
    /// `JOB_RESULT=PASS`).
    async fn user_job_printing(&self, id: &str, line: &str) -> JobStatus {
        let text = format!(
            r#"version: 1
target: {{id: "{id}"}}
timeouts:
  overall: {{minutes: 1}}
console_patterns:
  session_end: {{regex: "reboot: Power down"}}
  job_success: {{regex: "^JOB_RESULT=PASS"}}
deployment:
  start:
    kernel:
      url: "{api}/artifacts/kernel"
      cmdline:
        - "SALAD.machine_id={{{{ machine_id }}}}"
        - 'vivian.cmd="print {line}"'
        - "vivian.cmd=poweroff"
    initramfs:
      url: "{api}/artifacts/initrd"
"#,
            api = self.api
        );
        let path = self.dir.path().join("user-job.yml");
        std::fs::write(&path, text).unwrap();
        let mut opts = RunOptions::new(self.api.clone(), path);
        opts.interactive = false;
        tokio::time::timeout(Duration::from_secs(60), run_job(&opts))
            .await
            .expect("the user job ends in time")
    }
}

/// A console source whose every attachment first yields `stale`: what a
/// DUT printed in an earlier boot and the console still held when a job
/// attached (the discovery boot's "MaRS: Registration complete" while the
/// registration job powers the machine off, a previous job's last lines
/// still in SALAD's buffers).
struct StaleConsoles {
    inner: Arc<dyn ConsoleSource>,
    stale: &'static [u8],
}

#[async_trait::async_trait]
impl ConsoleSource for StaleConsoles {
    fn name(&self) -> String {
        self.inner.name()
    }
    async fn machines(
        &self,
    ) -> Result<Vec<vivian_core::console::ConsoleMachine>, vivian_core::console::ConsoleError> {
        self.inner.machines().await
    }
    async fn machine(
        &self,
        machine_id: &str,
    ) -> Result<vivian_core::console::ConsoleMachine, vivian_core::console::ConsoleError> {
        self.inner.machine(machine_id).await
    }
    async fn attach(
        &self,
        machine_id: &str,
    ) -> Result<vivian_core::console::ConsoleAttachment, vivian_core::console::ConsoleError> {
        use tokio::io::AsyncReadExt;
        let mut a = self.inner.attach(machine_id).await?;
        a.reader = Box::new(std::io::Cursor::new(self.stale).chain(a.reader));
        Ok(a)
    }
    async fn reset(
        &self,
        machine_id: &str,
    ) -> Result<vivian_core::console::ResetOutcome, vivian_core::console::ConsoleError> {
        self.inner.reset(machine_id).await
    }
    async fn read_log(
        &self,
        machine_id: &str,
        offset: u64,
        max_len: usize,
    ) -> Result<vivian_core::console::LogChunk, vivian_core::console::ConsoleError> {
        self.inner.read_log(machine_id, offset, max_len).await
    }
}

/// Edits MarsDB the way an admin's editor does: read, change, write a new
/// file and rename it over the old one.
fn edit_marsdb(path: &Path, f: impl FnOnce(&mut serde_yaml::Value)) {
    let mut v: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    let tmp = path.with_extension("yaml.swp");
    std::fs::write(&tmp, serde_yaml::to_string(&v).unwrap()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn dut_yaml<'a>(v: &'a mut serde_yaml::Value, mac: &str) -> &'a mut serde_yaml::Mapping {
    v["duts"][mac].as_mapping_mut().unwrap()
}

fn state_is(s: &'static str) -> impl FnMut(&Value) -> bool {
    move |d| d["state"] == s
}

const PDU_ONLY: &str = "pdus:\n  VPDU:\n    driver: vpdu\n    config:\n      hostname: '@VPDU@'\nduts: {}\ngitlab: {}\n";

#[tokio::test]
async fn shipped_templates_render_for_both_machine_kinds() {
    use vivian_core::job::{Job, MachineVars, ParseOptions, TemplateVars};
    let machine = MachineVars {
        id: "52:54:00:11:22:01".into(),
        local_tty_device: Some("ttyS1".into()),
        ..MachineVars::default()
    };
    for (template, kind) in [
        (REGISTRATION_JOB, "registration"),
        (BOOTLOOP_JOB, "bootloop"),
    ] {
        for dut in ["sim", "boot2container", ""] {
            let mut vars = TemplateVars::for_dut(&machine, "http://minio:9000", None);
            vars.set("training_dut", dut);
            vars.set("training_cmdline", "quiet");
            vars.set("training_kind", kind);
            vars.set("training_loop", 3);
            let job = Job::from_template(template, &vars, &ParseOptions::default())
                .unwrap_or_else(|e| panic!("{kind} ({dut:?}): {e}"));
            let cmdline = job.deployment.start.cmdline().unwrap();
            assert!(
                cmdline.contains("SALAD.machine_id=52:54:00:11:22:01"),
                "{cmdline}"
            );
            assert!(cmdline.contains("quiet"), "{cmdline}");
            assert_eq!(
                job.deployment.start.kernel.url.as_deref(),
                Some("http://minio:9000/boot/default_kernel")
            );
            if dut == "sim" {
                assert!(cmdline.contains("vivian.cmd="), "{cmdline}");
            } else {
                assert!(cmdline.contains("console=ttyS1,115200"), "{cmdline}");
                let verb = if kind == "registration" {
                    "register"
                } else {
                    "check"
                };
                assert!(
                    cmdline.contains(&format!("machine_registration:latest {verb}")),
                    "{cmdline}"
                );
            }
        }
    }
}

/// Discovery on a free port, registration, training with the shipped
/// templates, a user job, retire/activate with a quick check, a failing
/// quick check back to training, and recovery.
#[tokio::test]
async fn discovery_training_user_job_retire_activate_and_quick_checks() {
    let mut opts = Options::new(PDU_ONLY);
    opts.hold_quick_checks = true;
    let f = QualFarm::start(opts).await;
    let mac = outlet_mac(1);

    // Discovery: the machine behind port 1 boots the default configuration
    // and registers itself; it is bound to that port.
    let (status, body) = f
        .send(
            "POST",
            "/api/v1/dut/discover",
            Some(json!({"pdu": "VPDU", "port_id": 1, "timeout": 30})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let mut registered = false;
    for _ in 0..500 {
        if f.get(&format!("/api/v1/dut/{mac}")).await.0 == 200 {
            registered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(registered, "the discovered machine never registered");
    assert_eq!(f.get("/api/v1/dut/discover").await.1.trim(), "null");
    let file = std::fs::read_to_string(f.db_path()).unwrap();
    let db: serde_yaml::Value = serde_yaml::from_str(&file).unwrap();
    let entry = &db["duts"][mac.as_str()];
    assert_eq!(entry["pdu"].as_str(), Some("VPDU"), "{file}");
    assert_eq!(entry["pdu_port_id"].as_str(), Some("1"), "{file}");
    assert_eq!(entry["pdu_off_delay"].as_f64(), Some(0.1), "{file}");
    assert_eq!(entry["ready_for_service"].as_bool(), Some(false), "{file}");

    // Training: registration, then 2 boot loops, all passing: IDLE.
    let (d, seen) = f.wait(&mac, "trained", 60, |d| d["state"] == "IDLE").await;
    assert!(seen.contains(&"TRAINING".to_string()), "{seen:?}");
    assert_eq!(d["ready_for_service"], true, "{d}");
    assert_eq!(d["training"], json!({"state": "IDLE"}), "{d}");
    assert_eq!(f.logs("registration", &mac).len(), 1);
    let loops = f.logs("bootloop", &mac);
    assert_eq!(loops.len(), 2);
    assert!(
        loops.iter().all(|l| l.contains("SIMDUT.http_status=200")),
        "{loops:?}"
    );
    let file = std::fs::read_to_string(f.db_path()).unwrap();
    let db: serde_yaml::Value = serde_yaml::from_str(&file).unwrap();
    assert_eq!(
        db["duts"][mac.as_str()]["ready_for_service"].as_bool(),
        Some(true),
        "{file}"
    );

    // A user job runs on it.
    let status = f.user_job(&mac).await;
    assert_eq!(status, JobStatus::Pass, "{}", f.dump_logs());
    f.wait(&mac, "IDLE after the job", 10, state_is("IDLE"))
        .await;

    // Retire, then activate: a quick check, then IDLE.
    let (s, b) = f
        .send(
            "PATCH",
            &format!("/api/v1/dut/{mac}"),
            Some(json!({"is_retired": true})),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(f.dut(&mac).await["state"], "RETIRED");
    let (s, b) = f
        .send(
            "PATCH",
            &format!("/api/v1/dut/{mac}"),
            Some(json!({"is_retired": false})),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    // Queued at once, then running (held before its check).
    let d = f.dut(&mac).await;
    assert_eq!(d["state"], "QUICK_CHECK", "{d}");
    let d = f.held(&mac).await;
    assert_eq!(d["state"], "QUICK_CHECK", "{d}");
    assert_eq!(d["training"]["state"], "QUICK_CHECK", "{d}");
    f.release(&mac);
    f.wait(&mac, "quick-checked", 30, |d| {
        d["state"] == "IDLE" && f.logs("quick_check", &mac).len() == 1
    })
    .await;

    // The machine's check now fails (its boot-loop job changed on disk):
    // an API-requested quick check fails and the DUT goes back to training.
    let broken = BOOTLOOP_JOB.replace("/api/v1/dut/@MAC@", "/api/v1/dut/@MAC@/no-such-thing");
    assert_ne!(broken, BOOTLOOP_JOB);
    f.set_bootloop(&broken);
    let (s, b) = f
        .send("POST", &format!("/api/v1/dut/{mac}/quick_check"), None)
        .await;
    assert_eq!(s, 200, "{b}");
    let d = f.held(&mac).await;
    assert_eq!(d["state"], "QUICK_CHECK", "{d}");
    f.release(&mac);
    let (d, _) = f
        .wait(&mac, "back to training", 30, state_is("TRAINING"))
        .await;
    assert_eq!(d["ready_for_service"], false, "{d}");
    assert_eq!(f.logs("quick_check", &mac).len(), 2);
    // Its training fails too; the failed loop's log is served (loops[0]
    // is the registration, which passed: no log).
    let (d, _) = f
        .wait(&mac, "a failed training loop", 30, |d| {
            d["training"]["loops"][1]["has_log"] == true
        })
        .await;
    assert_eq!(d["training"]["loops"][1]["status"], "FAIL", "{d}");
    assert_eq!(d["training"]["loops"][0]["status"], "PASS", "{d}");
    assert_eq!(d["training"]["loops"][0]["has_log"], false, "{d}");
    let (s, log) = f.get(&format!("/api/v1/dut/{mac}/training/loop/1")).await;
    // The round may already have restarted (no loop any more): then 404.
    if s == 200 {
        assert!(log.contains("SIMDUT.http_status=404"), "{log}");
    } else {
        assert_eq!((s, log.as_str()), (404, "{\"error\":\"No log present\"}"));
    }
    let (s, _) = f.get(&format!("/api/v1/dut/{mac}/training/loop/99")).await;
    assert_eq!(s, 404);

    // The machine is fixed: the next training round qualifies it again.
    f.set_bootloop(BOOTLOOP_JOB);
    let (d, _) = f.wait(&mac, "IDLE again", 60, state_is("IDLE")).await;
    assert_eq!(d["ready_for_service"], true, "{d}");
    f.stop().await;
}

/// The same flow driven by hand edits of MarsDB: a DUT wired to its port in
/// the file trains; one failing half its boot loops keeps training; one
/// whose registration fails retries after the delay; `is_retired` flipped
/// in the file retires and activates (with a quick check).
#[tokio::test]
async fn hand_edited_marsdb_flaky_dut_and_failed_registration() {
    let a = outlet_mac(0); // flaky: every second boot loop fails
    let b = outlet_mac(2); // its registration fails until fixed
    let marsdb = format!(
        "pdus:\n  VPDU:\n    driver: vpdu\n    config:\n      hostname: '@VPDU@'\nduts:\n\
         \x20 {a}:\n    base_name: flaky\n    ip_address: 127.0.0.1\n    tags: [sim]\n    manual_tags: [flaky]\n    pdu_off_delay: 0.1\n\
         \x20 {b}:\n    base_name: late\n    ip_address: 127.0.0.1\n    tags: [sim]\n    pdu_off_delay: 0.1\n    comment: broken-registration\n\
         gitlab: {{}}\n"
    );
    let mut opts = Options::new(&marsdb);
    opts.retrial_delay = Duration::from_millis(1500);
    // The flaky machine fails its check on even loops.
    opts.bootloop = BOOTLOOP_JOB.replace(
        "/api/v1/dut/@MAC@\"",
        "/api/v1/dut/@MAC@{% if 'flaky' in machine.manual_tags and training_loop is even %}/broken{% endif %}\"",
    );
    assert_ne!(opts.bootloop, BOOTLOOP_JOB);
    // The late machine sends a field the executor refuses while its comment
    // says its registration is broken.
    opts.registration = REGISTRATION_JOB.replace(
        "ip_address=@IP@\"",
        "ip_address=@IP@{% if machine.comment == 'broken-registration' %} bogus=1{% endif %}\"",
    );
    assert_ne!(opts.registration, REGISTRATION_JOB);
    opts.hold_quick_checks = true;
    let f = QualFarm::start(opts).await;

    // No PDU port yet: both wait for their configuration.
    for id in [&a, &b] {
        f.wait(id, "WAIT_FOR_CONFIG", 10, state_is("WAIT_FOR_CONFIG"))
            .await;
    }
    // The admin wires them in the file.
    edit_marsdb(&f.db_path(), |v| {
        let d = dut_yaml(v, &a);
        d.insert("pdu".into(), "VPDU".into());
        d.insert("pdu_port_id".into(), "0".into());
        let d = dut_yaml(v, &b);
        d.insert("pdu".into(), "VPDU".into());
        d.insert("pdu_port_id".into(), 2.into());
    });

    // B: the registration fails; it is retried after the delay.
    let (d, _) = f
        .wait(&b, "registration failed", 30, |d| {
            d["training"]["state"] == "REGISTRATION_FAILED"
        })
        .await;
    assert_eq!(d["state"], "TRAINING", "{d}");
    assert_eq!(d["training"]["is_registered"], false, "{d}");
    let failed_at = Instant::now();
    // The failed registration's log is served (loops[0]) while it waits.
    assert_eq!(d["training"]["loops"][0]["status"], "FAIL", "{d}");
    let (s, log) = f.get(&format!("/api/v1/dut/{b}/training/loop/0")).await;
    assert_eq!(s, 200, "{log}");
    assert!(log.contains("SIMDUT.http_status=400"), "{log}");
    // The admin fixes it (by hand) while it waits.
    edit_marsdb(&f.db_path(), |v| {
        dut_yaml(v, &b).insert("comment".into(), "fixed".into());
    });
    f.wait(&b, "retrying", 10, |d| {
        d["training"]["state"] != "REGISTRATION_FAILED"
    })
    .await;
    let waited = failed_at.elapsed();
    assert!(
        waited >= Duration::from_millis(1200),
        "retried after {waited:?}"
    );
    let failed = &f.logs("registration", &b)[0];
    assert!(failed.contains("SIMDUT.http_status=400"), "{failed}");
    let (d, _) = f.wait(&b, "B trained", 60, state_is("IDLE")).await;
    assert_eq!(d["ready_for_service"], true, "{d}");
    assert_eq!(f.logs("registration", &b).len(), 2);

    // A: each round passes loop 1 and fails loop 2 (1 PASS, 2 needed): it
    // stays TRAINING and starts again from its registration.
    let (d, seen) = f
        .wait(&a, "a second round", 60, |_| {
            f.logs("registration", &a).len() >= 2
        })
        .await;
    assert_eq!(seen, ["TRAINING"], "{d}");
    assert_eq!(d["ready_for_service"], false, "{d}");
    // Logs of finished loops: the failed ones are all second loops.
    let loops = f.logs("bootloop", &a);
    let failed: Vec<_> = loops
        .iter()
        .filter(|l| l.contains("session end: FAIL"))
        .collect();
    let passed = loops
        .iter()
        .filter(|l| l.contains("session end: PASS"))
        .count();
    assert!(!failed.is_empty() && passed >= failed.len(), "{loops:?}");
    assert!(passed <= failed.len() + 1, "{loops:?}");
    assert!(
        failed.iter().all(|l| l.contains("boot loop 2 (bootloop)")),
        "{failed:?}"
    );

    // Retire A by hand while it trains: its job stops, it is RETIRED.
    edit_marsdb(&f.db_path(), |v| {
        dut_yaml(v, &a).insert("is_retired".into(), true.into());
    });
    let (d, _) = f
        .wait(&a, "A retired", 10, |d| {
            d["state"] == "RETIRED"
                && d["current_job"].is_null()
                && d["training"] == json!({"state": "IDLE"})
        })
        .await;
    assert_eq!(d["ready_for_service"], false, "{d}");

    // Retire and activate B by hand: RETIRED, then a quick check, IDLE.
    edit_marsdb(&f.db_path(), |v| {
        dut_yaml(v, &b).insert("is_retired".into(), true.into());
    });
    f.wait(&b, "B retired", 10, state_is("RETIRED")).await;
    edit_marsdb(&f.db_path(), |v| {
        dut_yaml(v, &b).insert("is_retired".into(), false.into());
    });
    let d = f.held(&b).await;
    assert_eq!(d["state"], "QUICK_CHECK", "{d}");
    f.release(&b);
    f.wait(&b, "B quick-checked", 30, |d| {
        d["state"] == "IDLE" && f.logs("quick_check", &b).len() == 1
    })
    .await;
    let status = f.user_job(&b).await;
    assert_eq!(status, JobStatus::Pass, "{}", f.dump_logs());
    f.stop().await;
}

/// What the console held before a job powered its DUT on decides nothing:
/// a success line and a session end printed by an earlier boot are shown
/// but not matched, for Sergent Hartman's registration (which must then
/// fail, as the real boot does, and be retried) and for user jobs.
#[tokio::test]
async fn console_lines_from_before_the_power_on_are_not_matched() {
    let ready = outlet_mac(0);
    let fresh = outlet_mac(1);
    let marsdb = format!(
        "pdus:\n  VPDU:\n    driver: vpdu\n    config:\n      hostname: '@VPDU@'\nduts:\n\
         \x20 {ready}:\n    base_name: ready\n    ip_address: 127.0.0.1\n    tags: [sim]\n    pdu: VPDU\n    pdu_port_id: '0'\n    pdu_off_delay: 0.1\n    ready_for_service: true\n\
         \x20 {fresh}:\n    base_name: fresh\n    ip_address: 127.0.0.1\n    tags: [sim]\n    pdu: VPDU\n    pdu_port_id: '1'\n    pdu_off_delay: 0.1\n\
         gitlab: {{}}\n"
    );
    let mut opts = Options::new(&marsdb);
    opts.quick_check = false;
    opts.retrial_delay = Duration::from_secs(30);
    // The real registration boot fails (the executor refuses a field)...
    opts.registration = REGISTRATION_JOB.replace("ip_address=@IP@\"", "ip_address=@IP@ bogus=1\"");
    assert_ne!(opts.registration, REGISTRATION_JOB);
    // ... but the console still holds the end of a successful one (both
    // template variants' success lines and session ends), and a user job's
    // success line.
    const STALE: &[u8] = b"MaRS: Registration complete\r\nSIMDUT.http_status=200\r\n\
        JOB_RESULT=PASS\r\nreboot: Power down\r\nMaRS: Registration comp";
    opts.stale_console = Some(STALE);
    let f = QualFarm::start(opts).await;

    let (d, _) = f
        .wait(&fresh, "registration failed", 30, |d| {
            d["training"]["state"] == "REGISTRATION_FAILED"
        })
        .await;
    assert_eq!(d["state"], "TRAINING", "{d}");
    assert_eq!(d["training"]["is_registered"], false, "{d}");
    let logs = f.logs("registration", &fresh);
    assert_eq!(logs.len(), 1, "{logs:?}");
    let log = &logs[0];
    // The stale lines are in the log, before the power-on, and said to be
    // ignored; the real boot's answer decided.
    assert!(log.contains("SIMDUT.http_status=200"), "{log}");
    assert!(
        log.contains("bytes of console output from before the power-on were not matched"),
        "{log}"
    );
    assert!(log.contains("SIMDUT.http_status=400"), "{log}");
    assert!(log.contains("session end: FAIL"), "{log}");

    // A user job: the DUT's real boot prints a failure.
    let (_, seen) = f.wait(&ready, "IDLE", 10, state_is("IDLE")).await;
    // SERGENT_HARTMAN_QUICK_CHECK disabled: IDLE at once, no quick check.
    assert_eq!(seen, ["IDLE"]);
    assert!(f.logs("quick_check", &ready).is_empty());
    let status = f.user_job_printing(&ready, "JOB_RESULT=FAIL").await;
    assert_eq!(status, JobStatus::Fail, "{}", f.dump_logs());
    f.wait(&ready, "IDLE after the job", 10, state_is("IDLE"))
        .await;
    // And one whose boot passes still passes (the stale partial line does
    // not swallow the new boot's first line).
    let status = f.user_job(&ready).await;
    assert_eq!(status, JobStatus::Pass, "{}", f.dump_logs());
    f.stop().await;
}

/// `SERGENT_HARTMAN_QUIET`: training jobs write no job log file (the
/// reference sends their output to /dev/null), but the log of a loop that
/// failed is still kept and served, and user jobs still get their log.
#[tokio::test]
async fn quiet_training_writes_no_job_logs_but_keeps_failed_loops() {
    let dut = outlet_mac(0);
    let marsdb = format!(
        "pdus:\n  VPDU:\n    driver: vpdu\n    config:\n      hostname: '@VPDU@'\nduts:\n\
         \x20 {dut}:\n    base_name: quiet\n    ip_address: 127.0.0.1\n    tags: [sim]\n    pdu: VPDU\n    pdu_port_id: '0'\n    pdu_off_delay: 0.1\n\
         gitlab: {{}}\n"
    );
    let mut opts = Options::new(&marsdb);
    opts.quiet = true;
    opts.quick_check = false;
    // Loop 1 fails, loop 2 passes: 1 PASS of 2 qualifies.
    opts.qualifying = 1;
    opts.bootloop = BOOTLOOP_JOB.replace(
        "/api/v1/dut/@MAC@\"",
        "/api/v1/dut/@MAC@{% if training_loop == 1 %}/broken{% endif %}\"",
    );
    assert_ne!(opts.bootloop, BOOTLOOP_JOB);
    let f = QualFarm::start(opts).await;

    // Loop 1 failed: its log is kept and served while loop 2 runs (at
    // least the port's 0.1 s off time).
    let (d, _) = f
        .wait(&dut, "a failed loop", 60, |d| {
            d["training"]["loops"][1]["has_log"] == true
        })
        .await;
    let (s, log) = f.get(&format!("/api/v1/dut/{dut}/training/loop/1")).await;
    assert_eq!(s, 200, "{log}");
    // The loop as EX A.1 shows it: the DUT booted (it fetched its boot
    // script) and talked, but its check failed; no power readings.
    let l = &d["training"]["loops"][1];
    assert_eq!(l["status"], "FAIL", "{d}");
    assert_eq!(l["firmware_booted_check"], true, "{d}");
    assert_eq!(l["console_data_received_check"], true, "{d}");
    assert!(l["energy_consumed_check"].is_null(), "{d}");
    assert!(l["seconds_elapsed"].as_f64().unwrap() > 0.0, "{d}");
    assert!(log.contains("SIMDUT.http_status=404"), "{log}");
    let (d, _) = f.wait(&dut, "trained", 60, state_is("IDLE")).await;
    assert_eq!(d["ready_for_service"], true, "{d}");
    for kind in ["registration", "bootloop", "quick_check"] {
        assert_eq!(f.logs(kind, &dut), Vec::<String>::new(), "{kind}");
    }
    // A user job still writes its log file.
    let status = f.user_job(&dut).await;
    assert_eq!(status, JobStatus::Pass);
    let files = std::fs::read_dir(f.dir.path().join("jobs"))
        .map(|rd| rd.count())
        .unwrap_or(0);
    assert_eq!(files, 1, "only the user job's log");
    f.stop().await;
}

/// DUTs written ready in MarsDB get a quick check when the executor starts
/// (EX D.4): one that passes becomes IDLE, one that fails goes back to
/// TRAINING, is trained again and then IDLE.
#[tokio::test]
async fn ready_duts_are_quick_checked_at_start_up_and_a_failure_retrains() {
    let good = outlet_mac(0);
    let bad = outlet_mac(1);
    let marsdb = format!(
        "pdus:\n  VPDU:\n    driver: vpdu\n    config:\n      hostname: '@VPDU@'\nduts:\n\
         \x20 {good}:\n    base_name: good\n    ip_address: 127.0.0.1\n    tags: [sim]\n    pdu: VPDU\n    pdu_port_id: '0'\n    pdu_off_delay: 0.1\n    ready_for_service: true\n\
         \x20 {bad}:\n    base_name: bad\n    ip_address: 127.0.0.1\n    tags: [sim]\n    manual_tags: [bad-check]\n    pdu: VPDU\n    pdu_port_id: '1'\n    pdu_off_delay: 0.1\n    ready_for_service: true\n\
         gitlab: {{}}\n"
    );
    let mut opts = Options::new(&marsdb);
    // The bad machine fails its quick checks (not its training loops).
    opts.bootloop = BOOTLOOP_JOB.replace(
        "/api/v1/dut/@MAC@\"",
        "/api/v1/dut/@MAC@{% if 'bad-check' in machine.manual_tags and training_kind == 'quick_check' %}/broken{% endif %}\"",
    );
    assert_ne!(opts.bootloop, BOOTLOOP_JOB);
    opts.hold_quick_checks = true;
    let f = QualFarm::start(opts).await;

    // Both are checked at once, each on its own.
    for id in [&good, &bad] {
        let d = f.held(id).await;
        assert_eq!(d["state"], "QUICK_CHECK", "{d}");
        assert_eq!(d["training"]["state"], "QUICK_CHECK", "{d}");
    }
    f.release(&good);
    let (d, _) = f
        .wait(&good, "quick-checked", 30, |d| {
            d["state"] == "IDLE" && f.logs("quick_check", &good).len() == 1
        })
        .await;
    assert_eq!(d["ready_for_service"], true, "{d}");
    assert!(f.logs("quick_check", &good)[0].contains("session end: PASS"));
    assert!(f.logs("registration", &good).is_empty());

    // The bad one was held all along: still QUICK_CHECK.
    assert_eq!(f.dut(&bad).await["state"], "QUICK_CHECK");
    f.release(&bad);
    let (d, seen) = f
        .wait(&bad, "retrained", 60, |d| {
            d["state"] == "IDLE" && f.logs("bootloop", &bad).len() == 2
        })
        .await;
    assert!(seen.contains(&"TRAINING".to_string()), "{seen:?}");
    assert_eq!(d["ready_for_service"], true, "{d}");
    let checks = f.logs("quick_check", &bad);
    assert_eq!(checks.len(), 1, "one quick check only, at start-up");
    assert!(checks[0].contains("session end: FAIL"), "{}", checks[0]);
    assert_eq!(f.logs("registration", &bad).len(), 1);
    f.stop().await;
}
