//! Job buckets end to end: the virtual farm's job engine with object
//! storage on a real S3 + IAM server (SeaweedFS from PyPI, which enforces
//! `aws:SourceIp` on the TCP peer address), a simulated DUT at 127.0.0.2,
//! and `executorctl -s DIR -a -g` (our client code, then the reference
//! client 0.2.1 from PyPI).
//!
//! A simulated DUT is a task of this test process; its S3 client is the
//! small HTTP service below ([`DutS3`]): the DUT's job script calls it
//! with the bucket name and credentials the job template gave it, and it
//! makes the S3 requests from the DUT's address, 127.0.0.2 (and checks
//! that the same credentials are refused from 127.0.0.1).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::Method;
use vivian::client::{run_job, RunOptions};
use vivian::demo::{DemoFarm, DemoOptions};
use vivian::job_bucket::{connect, AdminApi};
use vivian_core::job::JobStatus;
use vivian_core::marsdb::MarsDbExt;
use vivian_core::storage::{Credentials, IpPolicyStyle};
use vivian_storage::testing::Seaweed;
use vivian_storage::{IamAdmin, S3Store, SignedClient};
use warp::Filter;

const DUT: &str = "52:54:00:11:22:00";

/// What the DUT's S3 client saw.
#[derive(Debug, Default, Clone)]
struct DutReport {
    calls: usize,
    read: Option<String>,
    errors: Vec<String>,
}

/// The simulated DUT's S3 client: `GET /dut/<bucket>/<access key>/<secret>`
/// reads `input.txt` and writes `output.txt` from 127.0.0.2, deletes
/// `stale.txt`, and checks that reading from 127.0.0.1 is refused.
/// Answers 200 when everything went as expected.
struct DutS3 {
    addr: SocketAddr,
    report: Arc<Mutex<DutReport>>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn dut_s3_request(s3: &url::Url, tail: &str) -> Result<String, String> {
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    let mut parts = tail.splitn(3, '/');
    let (Some(bucket), Some(ak), Some(sk)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(format!("bad request {tail}"));
    };
    let creds = Credentials::new(decode(ak), decode(sk));
    let from = |ip: &str| {
        SignedClient::new(s3, &creds, "us-east-1", "s3", Some(ip.parse().unwrap())).unwrap()
    };
    let dut = from("127.0.0.2");
    let a = dut
        .send(
            Method::GET,
            &format!("/{bucket}/input.txt"),
            &[],
            &[],
            vec![],
        )
        .await
        .map_err(|e| e.to_string())?;
    if a.status != 200 {
        return Err(format!(
            "GET input.txt from 127.0.0.2: {} {}",
            a.status,
            a.text()
        ));
    }
    let read = a.text();
    let a = dut
        .send(
            Method::PUT,
            &format!("/{bucket}/results/output.txt"),
            &[],
            &[],
            b"written by the DUT".to_vec(),
        )
        .await
        .map_err(|e| e.to_string())?;
    if a.status != 200 {
        return Err(format!(
            "PUT output.txt from 127.0.0.2: {} {}",
            a.status,
            a.text()
        ));
    }
    let a = dut
        .send(
            Method::DELETE,
            &format!("/{bucket}/stale.txt"),
            &[],
            &[],
            vec![],
        )
        .await
        .map_err(|e| e.to_string())?;
    if a.status != 204 && a.status != 200 {
        return Err(format!(
            "DELETE stale.txt from 127.0.0.2: {} {}",
            a.status,
            a.text()
        ));
    }
    let a = from("127.0.0.1")
        .send(
            Method::GET,
            &format!("/{bucket}/input.txt"),
            &[],
            &[],
            vec![],
        )
        .await
        .map_err(|e| e.to_string())?;
    if a.status != 403 {
        return Err(format!(
            "GET input.txt from 127.0.0.1 was not refused: {} {}",
            a.status,
            a.text()
        ));
    }
    Ok(read)
}

impl DutS3 {
    async fn start(s3: url::Url) -> DutS3 {
        let report = Arc::new(Mutex::new(DutReport::default()));
        let r = report.clone();
        let route =
            warp::path("dut")
                .and(warp::path::tail())
                .then(move |tail: warp::path::Tail| {
                    let s3 = s3.clone();
                    let r = r.clone();
                    async move {
                        let res = dut_s3_request(&s3, tail.as_str()).await;
                        let mut rep = r.lock().unwrap();
                        rep.calls += 1;
                        match res {
                            Ok(read) => {
                                rep.read = Some(read);
                                warp::reply::with_status(
                                    "ok".to_string(),
                                    warp::http::StatusCode::OK,
                                )
                            }
                            Err(e) => {
                                rep.errors.push(e.clone());
                                warp::reply::with_status(
                                    e,
                                    warp::http::StatusCode::INTERNAL_SERVER_ERROR,
                                )
                            }
                        }
                    }
                });
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
        DutS3 {
            addr,
            report,
            _stop: tx,
        }
    }
}

/// The job: the DUT hands its template credentials to its S3 client and
/// passes when that says everything went as expected.
fn job_text(f: &DemoFarm, dut_s3: SocketAddr) -> String {
    format!(
        r#"version: 1
target: {{id: "{DUT}"}}
console_patterns:
  session_end: {{regex: "reboot: Power down"}}
  job_success: {{regex: "^SIMDUT.http_status=200"}}
timeouts:
  overall: {{minutes: 2}}
deployment:
  start:
    kernel:
      url: "{art}/kernel"
      cmdline:
        - "SALAD.machine_id={{{{ machine_id }}}}"
        - 'vivian.cmd="print minio_url={{{{ minio_url }}}}"'
        - 'vivian.cmd="get http://{dut_s3}/dut/{{{{ job_bucket }}}}/{{{{ job_bucket_access_key }}}}/{{{{ job_bucket_secret_key }}}}"'
        - 'vivian.cmd=poweroff'
    initramfs:
      url: "{art}/initrd"
"#,
        art = f.artifacts_url()
    )
}

fn share_dir(root: &Path) -> std::path::PathBuf {
    let d = root.join("share");
    std::fs::create_dir_all(d.join("sub")).unwrap();
    std::fs::write(d.join("input.txt"), "from the share directory").unwrap();
    std::fs::write(d.join("stale.txt"), "the DUT deletes this").unwrap();
    std::fs::write(d.join("sub/kept.txt"), "kept").unwrap();
    d
}

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

async fn submit_raw(f: &DemoFarm, minio: serde_json::Value, job: &str) -> (u16, serde_json::Value) {
    let meta = serde_json::json!({"version": 1, "callback": {"port": 9}, "minio": minio});
    let form = reqwest::multipart::Form::new()
        .part(
            "metadata",
            reqwest::multipart::Part::text(meta.to_string())
                .file_name("metadata")
                .mime_str("application/json")
                .unwrap(),
        )
        .part(
            "job",
            reqwest::multipart::Part::text(job.to_string())
                .file_name("job")
                .mime_str("application/x-yaml")
                .unwrap(),
        );
    let r = reqwest::Client::new()
        .post(format!("{}/api/v1/jobs", f.api_url))
        .multipart(form)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn job_bucket_end_to_end_on_seaweedfs() {
    let sw = tokio::task::spawn_blocking(Seaweed::start)
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("SeaweedFS is needed for this test: {e}"));
    let style = IpPolicyStyle::AllowOnlyIp;
    let iam = IamAdmin::new(&sw.url, &sw.admin, style).unwrap();
    // The submitter, member of g1.
    iam.create_group("g1").await.unwrap();
    let alice = iam.create_user_with_key("alice").await.unwrap();
    iam.add_user_to_group("alice", "g1").await.unwrap();

    // Start-up check of the root credentials.
    let Err(e) = connect(
        &sw.url,
        &Credentials::new(&sw.admin.access_key, "not-the-password"),
        AdminApi::Iam(style),
    )
    .await
    else {
        panic!("wrong root credentials are refused");
    };
    assert!(e.to_string().contains("Invalid (MinIO) credentials"), "{e}");
    assert!(
        !e.to_string().contains("not-the-password"),
        "secret masked: {e}"
    );

    let buckets = Arc::new(
        connect(&sw.url, &sw.admin, AdminApi::Iam(style))
            .await
            .unwrap(),
    );
    let f = DemoFarm::start(DemoOptions {
        duts: 1,
        job_buckets: Some(buckets.clone()),
        ..DemoOptions::default()
    })
    .await
    .unwrap();
    // The DUT's address is 127.0.0.2.
    let mac: vivian_core::marsdb::MacAddr = DUT.parse().unwrap();
    f.farm
        .db()
        .update(move |db| -> Result<(), std::convert::Infallible> {
            db.duts.get_mut(&mac).unwrap().ip_address = "127.0.0.2".parse().unwrap();
            Ok(())
        })
        .await
        .unwrap();
    let dut_s3 = DutS3::start(sw.url.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let job = job_text(&f, dut_s3.addr);
    let job_path = dir.path().join("job.yml");
    std::fs::write(&job_path, &job).unwrap();

    // Group membership refused, with the reason; nothing created.
    let (status, body) = submit_raw(
        &f,
        serde_json::json!({"credentials": {"access_key": alice.access_key, "secret_key": alice.secret_key.expose()}, "groups": ["g1", "g2"]}),
        &job,
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error_msg"]
            .as_str()
            .unwrap_or("")
            .contains("not a member of the group(s) g2"),
        "{body}"
    );
    let (status, body) = submit_raw(
        &f,
        serde_json::json!({"credentials": {"access_key": alice.access_key, "secret_key": "wrong"}, "groups": ["g1"]}),
        &job,
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(leftovers(&sw, &iam).await, (vec![], vec![]));

    // The job, with the share directory and the group.
    let share = share_dir(dir.path());
    let mut opts = RunOptions::new(f.api_url.clone(), job_path.clone());
    opts.interactive = false;
    opts.share_directory = Some(share.clone());
    opts.minio_auth = Some(format!(
        "{}:{}",
        alice.access_key,
        alice.secret_key.expose()
    ));
    opts.minio_groups = vec!["g1".into()];
    let status = tokio::time::timeout(Duration::from_secs(120), run_job(&opts))
        .await
        .expect("the job ends in time");
    let report = dut_s3.report.lock().unwrap().clone();
    assert_eq!(status, JobStatus::Pass, "{report:?}");
    assert_eq!(report.errors, Vec::<String>::new());
    // The DUT read the share directory's file with its credentials.
    assert_eq!(report.read.as_deref(), Some("from the share directory"));
    // What the DUT wrote came back; what it deleted is gone.
    assert_eq!(
        std::fs::read_to_string(share.join("results/output.txt")).unwrap(),
        "written by the DUT"
    );
    assert!(!share.join("stale.txt").exists());
    assert_eq!(
        std::fs::read_to_string(share.join("sub/kept.txt")).unwrap(),
        "kept"
    );
    // The job log has the storage URL, never the DUT's secret.
    let log = std::fs::read_dir(f.job_log_dir())
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect::<String>();
    assert!(
        log.contains(&format!(
            "minio_url={}",
            sw.url.as_str().trim_end_matches('/')
        )),
        "{log}"
    );
    // Nothing is left once the client has closed the session.
    let mut left = leftovers(&sw, &iam).await;
    for _ in 0..100 {
        if left == (vec![], vec![]) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = leftovers(&sw, &iam).await;
    }
    assert_eq!(left, (vec![], vec![]), "bucket or users left behind");

    f.stop().await;
    iam.delete_user_fully("alice").await.unwrap();
}

/// The reference client (`executorctl` 0.2.1 from PyPI) gets a usable
/// `minio_access_url`: its `mcli mirror` step (a stub on PATH, since `mc`
/// is not installable here) lists the bucket with the URL's credentials
/// through curl's SigV4 support while the executor waits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reference_client_receives_a_usable_access_url() {
    use std::os::unix::fs::PermissionsExt;
    let bin = tokio::task::spawn_blocking(vivian_storage::testing::venv)
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("the Python peers are needed: {e}"));
    let sw = tokio::task::spawn_blocking(Seaweed::start)
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("SeaweedFS is needed for this test: {e}"));
    let style = IpPolicyStyle::AllowOnlyIp;
    let iam = IamAdmin::new(&sw.url, &sw.admin, style).unwrap();
    let buckets = Arc::new(
        connect(&sw.url, &sw.admin, AdminApi::Iam(style))
            .await
            .unwrap(),
    );
    let f = DemoFarm::start(DemoOptions {
        duts: 1,
        job_buckets: Some(buckets),
        ..DemoOptions::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("mcli-out");
    std::fs::create_dir_all(&out).unwrap();
    let stub_dir = dir.path().join("stub-bin");
    std::fs::create_dir_all(&stub_dir).unwrap();
    let stub = stub_dir.join("mcli");
    std::fs::write(
        &stub,
        format!(
            r#"#!{python}
# The reference client runs: MC_HOST_client=<url> mcli --no-color mirror --overwrite --remove client/<bucket> <dir>
import os, subprocess, sys, urllib.parse
out = "{out}"
open(out + "/args", "w").write(" ".join(sys.argv[1:]))
url = urllib.parse.urlsplit(os.environ["MC_HOST_client"])
open(out + "/url", "w").write(os.environ["MC_HOST_client"])
bucket = [a for a in sys.argv[1:] if a.startswith("client/")][0][len("client/"):]
creds = urllib.parse.unquote(url.username) + ":" + urllib.parse.unquote(url.password)
status = subprocess.run(["curl", "-s", "-o", out + "/listing", "-w", "%{{http_code}}",
    "--aws-sigv4", "aws:amz:us-east-1:s3", "-u", creds,
    "http://%s:%d/%s?list-type=2" % (url.hostname, url.port, bucket)],
    capture_output=True, text=True).stdout
open(out + "/status", "w").write(status)
"#,
            out = out.display(),
            python = bin.join("python").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755)).unwrap();
    let job = r#"version: 1
target: {id: "52:54:00:11:22:00"}
console_patterns:
  session_end: {regex: "reboot: Power down"}
  job_success: {regex: "^JOB_RESULT=PASS"}
deployment:
  start:
    kernel:
      url: "@ART@/kernel"
      cmdline: ['SALAD.machine_id={{ machine_id }}', 'vivian.cmd="print JOB_RESULT=PASS"', 'vivian.cmd=poweroff']
    initramfs:
      url: "@ART@/initrd"
"#
    .replace("@ART@", &f.artifacts_url());
    let job_path = dir.path().join("job.yml");
    std::fs::write(&job_path, job).unwrap();
    let share = share_dir(dir.path());
    let api = f.api_url.clone();
    let args = vec![
        "-e".to_string(),
        api,
        "run".into(),
        "-s".into(),
        share.display().to_string(),
        job_path.display().to_string(),
    ];
    let output = tokio::task::spawn_blocking(move || {
        let path = format!(
            "{}:{}:{}",
            stub_dir.display(),
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let child = std::process::Command::new(bin.join("executorctl"))
            .args(&args)
            .env("PATH", path)
            .env_remove("VALVE_MINIO_AUTH_CREDENTIALS")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start the reference executorctl");
        let pid = child.id();
        let killer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(90));
            // SAFETY: signalling the child we started, by its PID.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        });
        let o = child.wait_with_output().unwrap();
        drop(killer);
        o
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stdout}\n{stderr}");
    let args = std::fs::read_to_string(out.join("args")).expect("the client ran mcli");
    assert!(
        args.contains("mirror --overwrite --remove client/job-52-54-00-11-22-00-"),
        "{args}"
    );
    let url = std::fs::read_to_string(out.join("url")).unwrap();
    // IAM generates the client's access key: the URL carries it, not the
    // administrator's.
    assert!(url.starts_with("http://") && url.contains('@'), "{url}");
    assert!(!url.contains(&sw.admin.access_key), "{url}");
    assert_eq!(
        std::fs::read_to_string(out.join("status")).unwrap(),
        "200",
        "{}",
        std::fs::read_to_string(out.join("listing")).unwrap_or_default()
    );
    let listing = std::fs::read_to_string(out.join("listing")).unwrap();
    assert!(
        listing.contains("<Key>input.txt</Key>") && listing.contains("<Key>sub/kept.txt</Key>"),
        "{listing}"
    );
    // Once the client is gone, so is everything the job created.
    let mut left = leftovers(&sw, &iam).await;
    for _ in 0..100 {
        if left == (vec![], vec![]) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = leftovers(&sw, &iam).await;
    }
    assert_eq!(left, (vec![], vec![]), "bucket or users left behind");
    f.stop().await;
}
